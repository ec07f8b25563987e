"""Independent float64 oracle for GHL gradients (imports nothing from ghlc).

It runs a *plain* (unprepared) copy of a model under its own TorchFunctionMode, records every
conv/linear call whose weight is one of the named parameters (directly, as a view, or computed
inside the owning module's forward), and recomputes the rule with explicit float64 ops:

    y = softmax(t*u) over output units,  H = sum y.x - (sum y*u)[k] W[k],
    Hn = H / (max|H| + 1e-30),  grad = |Hn| * sign(G)   (or -Hn without a global signal).

Convolutions use an explicit patch correlation (``F.unfold`` for 1-d/2-d, ``Tensor.unfold``
for 3-d); transposed convolutions correlate the input with patches of the output instead.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

_CONV = {
    F.conv1d: (1, False), F.conv2d: (2, False), F.conv3d: (3, False),
    F.conv_transpose1d: (1, True), F.conv_transpose2d: (2, True), F.conv_transpose3d: (3, True),
}
_LINEAR = F.linear
_MHA = F.multi_head_attention_forward
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TCONV_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
               "dilation")


def _nt(v, n):
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    return v * n if len(v) == 1 else v


@dataclass
class Call:
    """One recorded use of a plastic weight (tensors detached, float64)."""

    name: str
    kind: str  # "linear" | "conv"
    x: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor  # the weight as used (a view / computed tensor, or the parameter)
    view: tuple | None = None  # (size, stride, offset) into the parameter
    nd: int = 0
    transposed: bool = False
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    use: str = "direct"


class _Recorder(TorchFunctionMode):
    def __init__(self, params: dict[int, list[str]], names: set[str], shapes: dict[str, tuple],
                 stack: list[str]):
        super().__init__()
        self.params, self.names, self.shapes, self.stack = params, names, shapes, stack
        self.calls: list[Call] = []

    def _named(self, t):
        """The tracked name of parameter ``t`` (any of its aliases when weights are tied)."""
        for n in self.params.get(id(t), ()):
            if n in self.names:
                return n
        return None

    def _resolve(self, w):
        name = self._named(w)
        if id(w) in self.params:
            return (name, None, "direct") if name is not None else (None, None, None)
        base = w._base
        if base is not None and self._named(base) is not None:
            off = w.storage_offset() - base.storage_offset()
            return self._named(base), (tuple(w.size()), tuple(w.stride()), off), "view"
        if not isinstance(w, torch.nn.Parameter) and self.stack:
            owner = self.stack[-1]
            cand = (owner + "." if owner else "") + "weight"
            if cand in self.names and self.shapes[cand] == tuple(w.shape):
                return cand, None, "computed"
        return None, None, None

    def _handle(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if func is _LINEAR:
            a = dict(zip(("input", "weight", "bias"), args))
            a.update(kwargs)
            name, view, use = self._resolve(a["weight"])
            if name is not None:
                self.calls.append(Call(name, "linear", _d(a["input"]), _d(out), _d(a["weight"]),
                                       view, use=use))
            return out
        info = _CONV.get(func)
        if info is None:
            return out
        nd, tr = info
        a = dict(zip(_TCONV_ARGS if tr else _CONV_ARGS, args))
        a.update(kwargs)
        name, view, use = self._resolve(a["weight"])
        if name is None:
            return out
        x, u = a["input"], out
        if x.dim() == nd + 1:
            x, u = x.unsqueeze(0), u.unsqueeze(0)
        w = a["weight"]
        dil = _nt(a.get("dilation", 1), nd)
        pad = a.get("padding", 0)
        if isinstance(pad, str):
            if pad == "valid":
                pad = 0
            else:
                tot = [d * (k - 1) for d, k in zip(dil, w.shape[2:])]
                if any(t % 2 for t in tot):
                    raise NotImplementedError("oracle: asymmetric 'same' padding")
                pad = tuple(t // 2 for t in tot)
        self.calls.append(Call(
            name, "conv", _d(x), _d(u), _d(w), view, nd, tr, _nt(a.get("stride", 1), nd),
            _nt(pad, nd), dil, int(a.get("groups", 1)), use))
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _MHA:  # dispatched as one unit: see its inner linear calls too
            F.linear = lambda *a, **k: self._handle(_LINEAR, a, k)
            try:
                return func(*args, **kwargs)
            finally:
                F.linear = _LINEAR
        return self._handle(func, args, kwargs)


def _d(t):
    return t.detach().to(torch.float64).clone()


# ---- the rule, from scratch ----------------------------------------------------------------


def patches(t: torch.Tensor, k, s, p, d) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *L, *k): zero-padded, strided, dilated windows of ``t``."""
    nd = t.dim() - 2
    n, c = t.shape[:2]
    if nd in (1, 2):
        t2 = t.unsqueeze(2) if nd == 1 else t
        one = (lambda v: (1, v[0])) if nd == 1 else (lambda v: tuple(v))
        pad = (0, p[0]) if nd == 1 else tuple(p)
        cols = F.unfold(t2, one(k), dilation=one(d), padding=pad, stride=one(s))
        sp = [(t2.shape[2 + i] + 2 * pad[i] - one(d)[i] * (one(k)[i] - 1) - 1) // one(s)[i] + 1
              for i in range(2)]
        cols = cols.view(n, c, *one(k), *sp)  # (N, C, k0, k1, L0, L1)
        cols = cols.permute(0, 1, 4, 5, 2, 3)
        return cols.squeeze(4).squeeze(2) if nd == 1 else cols
    t = F.pad(t, [q for i in reversed(range(nd)) for q in (p[i], p[i])])
    for i in range(nd):
        t = t.unfold(2 + i, d[i] * (k[i] - 1) + 1, s[i])[..., :: d[i]]
    return t


def compete(u: torch.Tensor, dim: int, rule: dict, groups: int = 1) -> torch.Tensor:
    comp = rule.get("competition", "softmax")
    if comp == "none":
        return u
    t = rule.get("temperature", 1.0)
    v = u.unflatten(dim, (groups, u.shape[dim] // groups)) if groups > 1 else u
    dd = dim + 1 if groups > 1 else dim
    if comp == "softmax":
        y = torch.softmax(t * v, dim=dd)
    else:
        y = torch.zeros_like(v).scatter_(dd, v.argmax(dim=dd, keepdim=True), 1.0)
    return y.flatten(dim, dim + 1) if groups > 1 else y


def grid_steps(frac: float, nd: int) -> tuple[int, ...]:
    """Steps of the sampled positions grid: nd integers with product round(1/frac), the
    smallest largest one, then the lexicographically first (brute force)."""
    n = max(1, round(1 / frac))
    tuples = [t for t in itertools.product(range(1, n + 1), repeat=nd) if math.prod(t) == n]
    return min(tuples, key=lambda t: (max(t), t))


def sample_mask(c: Call, rule: dict) -> torch.Tensor | None:
    """The sampled mode's 0/1 mask over the call's terms (rows for linear, (N, *positions) of
    the output for convs), or None when exact. ``rule["draw"](n)`` gives the integer in
    [0, n) the runtime draws (tests patch the runtime's draw with the same function)."""
    frac = rule.get("sample_fraction", 1.0)
    if frac >= 1.0:
        return None
    draw, over = rule["draw"], rule.get("sample_over", "batch")
    if c.kind == "linear":
        rows = c.u.reshape(-1, c.u.shape[-1]).shape[0]
        mask = torch.zeros(rows, dtype=torch.float64)
        if over == "positions":
            q = min(rows, round(1 / frac))
            mask[draw(q)::q] = 1
            return mask
    else:
        n, out = c.u.shape[0], c.u.shape[2:]
        mask = torch.zeros(n, *out, dtype=torch.float64)
        if over == "positions" and not c.transposed:
            index: list = [slice(None)]
            for o, q in zip(out, grid_steps(frac, len(out))):
                q = min(q, o)
                index.append(slice(draw(q), None, q))
            mask[tuple(index)] = 1
            return mask
        rows = n
    k = max(1, round(frac * rows))
    start = draw(rows - k + 1) if k < rows else 0
    mask[start:start + k] = 1
    return mask


def call_term(c: Call, rule: dict) -> torch.Tensor:
    """Raw H of one call, shaped like the weight as used."""
    oja = rule.get("local_rule", "oja") == "oja"
    mask = sample_mask(c, rule)
    if c.kind == "linear":
        x = c.x.reshape(-1, c.x.shape[-1])
        u = c.u.reshape(-1, c.u.shape[-1])
        y = compete(u, 1, rule)
        if mask is not None:
            y = y * mask[:, None]
        h = y.t() @ x
        if oja:
            h = h - (y * u).sum(0)[:, None] * c.w
        return h
    g = c.groups
    scope_groups = g if rule.get("competition_scope", "layer") == "group" else 1
    y = compete(c.u, 1, rule, scope_groups)
    if mask is not None:
        y = y * mask.unsqueeze(1)
    k = tuple(c.w.shape[2:])
    n = c.x.shape[0]
    kf = math.prod(k)
    if not c.transposed:  # w: (Cout, Cin/g, *k)
        cout, cig = c.w.shape[:2]
        pt = patches(c.x, k, c.stride, c.padding, c.dilation)
        sp = tuple(c.u.shape[2:])
        pt = pt[(slice(None), slice(None)) + tuple(slice(0, L) for L in sp)]
        pt = pt.reshape(n, g, cig, -1, kf)
        yy = y.reshape(n, g, cout // g, -1)
        corr = torch.einsum("ngol,ngclk->gock", yy, pt).reshape(cout, cig, *k)
        scale = (y * c.u).sum(dim=[i for i in range(c.u.dim()) if i != 1])
        return corr - scale.view(-1, *[1] * (1 + len(k))) * c.w if oja else corr
    cin, cog = c.w.shape[:2]  # transposed: w (Cin, Cout/g, *k); out[o*s... ] from in[i]
    pt = patches(y, k, c.stride, c.padding, c.dilation)
    sp = tuple(c.x.shape[2:])
    pt = pt[(slice(None), slice(None)) + tuple(slice(0, L) for L in sp)]
    pt = pt.reshape(n, g, cog, -1, kf)
    xx = c.x.reshape(n, g, cin // g, -1)
    corr = torch.einsum("ngcl,ngjlk->gcjk", xx, pt).reshape(cin, cog, *k)
    if not oja:
        return corr
    s = (y * c.u).sum(dim=[i for i in range(c.u.dim()) if i != 1])  # per output unit
    sw = s.view(g, 1, cog).expand(g, cin // g, cog).reshape(cin, cog)
    return corr - sw.view(cin, cog, *[1] * len(k)) * c.w


def raw_terms(calls: list[Call], shapes: dict[str, tuple], rule: dict) -> dict[str, torch.Tensor]:
    """Sum of the raw terms of every call, per parameter name (float64)."""
    out: dict[str, torch.Tensor] = {}
    for c in calls:
        h = call_term(c, rule)
        if c.view is not None:
            full = torch.zeros(shapes[c.name], dtype=torch.float64)
            full.as_strided(*c.view).add_(h)
            h = full
        out[c.name] = h if c.name not in out else out[c.name] + h
    return out


def expected_grad(h: torch.Tensor, g: torch.Tensor | None, global_signal: str = "grad_sign",
                  normalisation: str = "layer"):
    if normalisation == "layer":
        hn = h / (h.abs().max() + 1e-30)
    else:  # per output unit, units along dim 0 (no transposed convs in the oracle's models)
        hn = torch.stack([row / (row.abs().max() + 1e-30) for row in h])
    if global_signal == "none":
        return -hn
    return hn.abs() * torch.sign(g.to(torch.float64))


# ---- running a plain model -------------------------------------------------------------------


def record(model: torch.nn.Module, inputs: tuple, names, fn=None):
    """Forward ``model`` (as is) on ``inputs`` recording the calls of params ``names``.
    Returns (output, calls)."""
    names = set(names)
    params: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(n)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    mod_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack: list[str] = []

    def pre(mod, args):
        stack.append(mod_names.get(id(mod), "?"))

    def post(mod, args, out):  # returns None: the output is kept
        stack.pop()

    h1 = register_module_forward_pre_hook(pre)
    h2 = register_module_forward_hook(post)
    rec = _Recorder(params, names, shapes, stack)
    try:
        with rec:
            out = fn(model, inputs) if fn is not None else model(*inputs)
    finally:
        h1.remove()
        h2.remove()
    return out, rec.calls


def run_plain(model, inputs: tuple, names, loss_fn, rule: dict | None = None,
              zero: bool = True):
    """Train-mode forward + backward of the plain ``model``: returns (H raw per name,
    plain grads of every parameter (float64, accumulated), calls)."""
    rule = rule or {}
    model.train()
    if zero:
        model.zero_grad(set_to_none=True)
    out, calls = record(model, inputs, names)
    loss_fn(out).backward()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    h = raw_terms(calls, shapes, rule)
    grads = {n: (p.grad.detach().to(torch.float64).clone() if p.grad is not None else None)
             for n, p in model.named_parameters(remove_duplicate=False)}
    return h, grads, calls
