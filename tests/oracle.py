"""The float64 oracle of the GHL rule. It imports nothing from ghlc and shares no code with it.

For one call ``u = f(x; W) + b`` of a plastic weight (DESIGN.md, "The rule"):

1. competition  ``y = softmax(t*u)`` over the output units, separately at every other
   position (or one-hot argmax, or ``y = u``); with scope "group", within each conv group;
2. local rule   ``H = sum y.x - (sum y*u)[k] W[k]`` ("oja"), or ``H = sum y.x`` ("hebb");
3. normalise    ``Hn = H / (max|H| + 1e-30)`` over the layer (or over each output unit);
4. combine      ``grad = |Hn| * sign(G)`` ("grad_sign"), or ``-Hn`` (global signal "none").

``sum y.x`` is written out: every output position's window of the (padded) input times y for
convolutions; transposed convolutions correlate the input with windows of y instead, since
input position i feeds the output window at i*stride. No autograd and no weight-gradient
kernel are used. H of several calls of one weight (sharing, views, weights computed in the
owner's forward) is summed before normalising.

Two ways in: ``hebbian(module, x, rule)`` for one layer and one input, and
``run_plain(model, inputs, names, loss_fn, rule)``, which runs an unprepared model under a
TorchFunctionMode that records every conv/linear call of the named weights. ``rule`` is a
dict with the keys of ``RULE`` (missing keys take those defaults).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

RULE = {
    "competition": "softmax",  # "softmax" | "hard" | "none"
    "temperature": 1.0,
    "competition_scope": "layer",  # "layer" | "group"
    "local_rule": "oja",  # "oja" | "hebb"
    "sample_fraction": 1.0,  # < 1: the sampled mode (see sample_mask)
    "sample_over": "batch",  # "batch" | "positions"
}

CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Call:
    """One use of a plastic weight (tensors detached, float64, batched).

    ``padding`` is symmetric per spatial dim; an asymmetric 'same' padding is applied to ``x``
    on record, leaving zeros here."""

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
    use: str = "direct"  # "direct" | "view" | "computed"


def _rule(rule: dict | None) -> dict:
    return {**RULE, **(rule or {})}


# ---- 1. competition --------------------------------------------------------------------------
def compete(u: torch.Tensor, dim: int, rule: dict | None = None, groups: int = 1) -> torch.Tensor:
    """y from u over the unit axis ``dim``; ``groups`` > 1 competes within each group."""
    rule = _rule(rule)
    if rule["competition"] == "none":
        return u.clone()
    v = u.movedim(dim, -1)
    n_units = v.shape[-1]
    v = v.reshape(*v.shape[:-1], groups, n_units // groups)  # (..., groups, units per group)
    if rule["competition"] == "softmax":
        z = rule["temperature"] * v
        e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
        y = e / e.sum(dim=-1, keepdim=True)
    elif rule["competition"] == "hard":
        y = torch.zeros_like(v).scatter_(-1, v.argmax(dim=-1, keepdim=True), 1.0)
    else:
        raise ValueError(rule["competition"])
    return y.reshape(*y.shape[:-2], n_units).movedim(-1, dim)


# ---- windows of a tensor ---------------------------------------------------------------------
def patches(t: torch.Tensor, k, s, p, d) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *L, *k): the zero-padded (``p`` per dim), strided, dilated windows
    of ``t``, one per output position."""
    nd = t.dim() - 2
    t = F.pad(t, [q for i in reversed(range(nd)) for q in (p[i], p[i])])
    for i in range(nd):  # each unfold appends one window dim; [::d] keeps the dilated taps
        t = t.unfold(2 + i, d[i] * (k[i] - 1) + 1, s[i])[..., :: d[i]]
    return t


# ---- 2. the local rule of one call -------------------------------------------------------------
def call_term(c: Call, rule: dict | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Raw H of one call, shaped like the weight as used. ``mask`` (0/1; (rows,) for linear,
    (N, *out positions) for convs) keeps only those terms of both sums; by default it is
    ``sample_mask(c, rule)`` (None when exact)."""
    rule = _rule(rule)
    if mask is None:
        mask = sample_mask(c, rule)
    oja = rule["local_rule"] == "oja"
    if rule["local_rule"] not in ("oja", "hebb"):
        raise ValueError(rule["local_rule"])
    if c.kind == "linear":  # every leading index of x is a sample
        x = c.x.reshape(-1, c.x.shape[-1])
        u = c.u.reshape(-1, c.u.shape[-1])
        y = compete(u, 1, rule)
        if mask is not None:
            y = y * mask[:, None]
        corr = y.t() @ x
        return corr - (y * u).sum(0)[:, None] * c.w if oja else corr
    g = c.groups
    y = compete(c.u, 1, rule, g if rule["competition_scope"] == "group" else 1)
    if mask is not None:
        y = y * mask.unsqueeze(1)
    k = tuple(c.w.shape[2:])
    n, kf = c.x.shape[0], math.prod(k)
    s = (y * c.u).sum(dim=[i for i in range(c.u.dim()) if i != 1])  # sum y*u per output unit
    if not c.transposed:  # w (C_out, C_in/g, *k): sum over n, positions l of y[n,o,l] x-window
        cout, cig = c.w.shape[:2]
        pt = patches(c.x, k, c.stride, c.padding, c.dilation)
        pt = pt[(slice(None), slice(None)) + tuple(slice(0, L) for L in c.u.shape[2:])]
        pt = pt.reshape(n, g, cig, -1, kf)
        yy = y.reshape(n, g, cout // g, -1)
        corr = torch.einsum("ngol,ngclk->gock", yy, pt).reshape(cout, cig, *k)
        return corr - s.view(-1, *[1] * (1 + len(k))) * c.w if oja else corr
    # transposed: w (C_in, C_out/g, *k); input position l feeds the y-window at l*stride
    cin, cog = c.w.shape[:2]
    pt = patches(y, k, c.stride, c.padding, c.dilation)
    pt = pt[(slice(None), slice(None)) + tuple(slice(0, L) for L in c.x.shape[2:])]
    pt = pt.reshape(n, g, cog, -1, kf)
    xx = c.x.reshape(n, g, cin // g, -1)
    corr = torch.einsum("ngcl,ngjlk->gcjk", xx, pt).reshape(cin, cog, *k)
    if not oja:
        return corr
    # weight [c, j] feeds output unit group(c) * C_out/g + j
    sw = s.view(g, 1, cog).expand(g, cin // g, cog).reshape(cin, cog)
    return corr - sw.view(cin, cog, *[1] * len(k)) * c.w


# ---- 3. and 4. normalise and combine --------------------------------------------------------
def normalise(
    h: torch.Tensor, normalisation: str = "layer", transposed_groups: int = 0
) -> torch.Tensor:
    """H / max|H| over the layer, or over each output unit ("unit"): units along dim 0, or,
    for a transposed conv's (C_in, C_out/g, *k) weight with ``transposed_groups`` g, unit
    (group, j) owning column j of the group's rows."""
    h = h.double()
    if normalisation == "layer":
        return h / (h.abs().max() + 1e-30)
    if normalisation != "unit":
        raise ValueError(normalisation)
    out = torch.empty_like(h)
    if not transposed_groups:
        for k in range(h.shape[0]):
            out[k] = h[k] / (h[k].abs().max() + 1e-30)
        return out
    g, cig = transposed_groups, h.shape[0] // transposed_groups
    for gi, j in itertools.product(range(g), range(h.shape[1])):
        block = h[gi * cig : (gi + 1) * cig, j]
        out[gi * cig : (gi + 1) * cig, j] = block / (block.abs().max() + 1e-30)
    return out


def expected_grad(
    h: torch.Tensor,
    g: torch.Tensor | None,
    global_signal: str = "grad_sign",
    normalisation: str = "layer",
    module: nn.Module | None = None,
) -> torch.Tensor:
    """The plastic weight's gradient from raw H and the backprop gradient G (``module`` only
    says where a transposed conv's units lie, for "unit" normalisation)."""
    tg = module.groups if isinstance(module, CONV_T) else 0
    hn = normalise(h, normalisation, tg)
    if global_signal == "none":
        return -hn
    if global_signal != "grad_sign":
        raise ValueError(global_signal)
    return hn.abs() * torch.sign(g.double())


# ---- the sampled mode --------------------------------------------------------------------------
def grid_steps(frac: float, nd: int) -> tuple[int, ...]:
    """Steps of the sampled positions grid: nd integers with product round(1/frac), the
    smallest largest one, then the lexicographically first (brute force)."""
    n = max(1, round(1 / frac))
    tuples = [t for t in itertools.product(range(1, n + 1), repeat=nd) if math.prod(t) == n]
    return min(tuples, key=lambda t: (max(t), t))


def sample_mask(c: Call, rule: dict | None = None) -> torch.Tensor | None:
    """The sampled mode's 0/1 mask over the call's terms (rows for linear, (N, *positions) of
    the output for convs), or None when exact. ``rule["draw"](n)`` gives the integer in
    [0, n) the runtime draws (tests patch the runtime's draw with the same function)."""
    rule = _rule(rule)
    frac = rule["sample_fraction"]
    if frac >= 1.0:
        return None
    draw, over = rule["draw"], rule["sample_over"]
    if c.kind == "linear":
        rows = c.u.reshape(-1, c.u.shape[-1]).shape[0]
        mask = torch.zeros(rows, dtype=torch.float64)
        if over == "positions":  # every q-th row from a drawn offset
            q = min(rows, round(1 / frac))
            mask[draw(q) :: q] = 1
            return mask
    else:
        n, out = c.u.shape[0], c.u.shape[2:]
        mask = torch.zeros(n, *out, dtype=torch.float64)
        if over == "positions" and not c.transposed:  # a strided grid, one offset per dim
            index: list = [slice(None)]
            for o, q in zip(out, grid_steps(frac, len(out))):
                q = min(q, o)
                index.append(slice(draw(q), None, q))
            mask[tuple(index)] = 1
            return mask
        rows = n
    k = max(1, round(frac * rows))  # "batch": a contiguous run of round(frac * rows) samples
    start = draw(rows - k + 1) if k < rows else 0
    mask[start : start + k] = 1
    return mask


# ---- recording the calls of a plain model ------------------------------------------------------
_CONV = {
    F.conv1d: (1, False),
    F.conv2d: (2, False),
    F.conv3d: (3, False),
    F.conv_transpose1d: (1, True),
    F.conv_transpose2d: (2, True),
    F.conv_transpose3d: (3, True),
}
_LINEAR = F.linear
_MHA = F.multi_head_attention_forward
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TCONV_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "output_padding",
    "groups",
    "dilation",
)


def _nt(v, n):
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    return v * n if len(v) == 1 else v


def _d(t):
    return t.detach().to(torch.float64).clone()


class _Recorder(TorchFunctionMode):
    def __init__(
        self,
        params: dict[int, list[str]],
        names: set[str],
        shapes: dict[str, tuple],
        stack: list[str],
    ):
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
        """(name, view, use) of the weight a call uses, or Nones when it is not tracked."""
        name = self._named(w)
        if id(w) in self.params:
            return (name, None, "direct") if name is not None else (None, None, None)
        base = w._base
        if base is not None and self._named(base) is not None:
            off = w.storage_offset() - base.storage_offset()
            return self._named(base), (tuple(w.size()), tuple(w.stride()), off), "view"
        if not isinstance(w, torch.nn.Parameter) and self.stack:  # computed in owner.forward
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
                self.calls.append(
                    Call(name, "linear", _d(a["input"]), _d(out), _d(a["weight"]), view, use=use)
                )
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
        x, u, w = _d(a["input"]), _d(out), a["weight"]
        if x.dim() == nd + 1:  # unbatched
            x, u = x.unsqueeze(0), u.unsqueeze(0)
        dil = _nt(a.get("dilation", 1), nd)
        pad = a.get("padding", 0)
        if pad == "valid":
            pad = 0
        elif pad == "same":  # torch puts the odd one of a total padding on the right
            tot = [d * (k - 1) for d, k in zip(dil, w.shape[2:])]
            x = F.pad(x, [q for t in reversed(tot) for q in (t // 2, t - t // 2)])
            pad = 0
        self.calls.append(
            Call(
                name,
                "conv",
                x,
                u,
                _d(w),
                view,
                nd,
                tr,
                _nt(a.get("stride", 1), nd),
                _nt(pad, nd),
                dil,
                int(a.get("groups", 1)),
                use,
            )
        )
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


def record(model: nn.Module, inputs: tuple, names, fn=None) -> tuple:
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


def raw_terms(
    calls: list[Call], shapes: dict[str, tuple], rule: dict | None = None
) -> dict[str, torch.Tensor]:
    """Sum of the raw terms of every call, per parameter name (float64); a view's term is
    added into the parameter's shape where the view lies."""
    out: dict[str, torch.Tensor] = {}
    for c in calls:
        h = call_term(c, rule)
        if c.view is not None:
            full = torch.zeros(shapes[c.name], dtype=torch.float64)
            full.as_strided(*c.view).add_(h)
            h = full
        out[c.name] = h if c.name not in out else out[c.name] + h
    return out


def run_plain(
    model: nn.Module, inputs: tuple, names, loss_fn, rule: dict | None = None, zero: bool = True
) -> tuple:
    """Train-mode forward + backward of the plain ``model``: returns (H raw per name,
    plain grads of every parameter (float64, accumulated), calls)."""
    model.train()
    if zero:
        model.zero_grad(set_to_none=True)
    out, calls = record(model, inputs, names)
    loss_fn(out).backward()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    h = raw_terms(calls, shapes, rule)
    grads = {
        n: (p.grad.detach().to(torch.float64).clone() if p.grad is not None else None)
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    return h, grads, calls


# ---- one layer, one input ----------------------------------------------------------------------
def hebbian(
    module: nn.Module, x: torch.Tensor, rule: dict | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw H (float64, the weight's shape) of the one call ``module(x)`` (``mask`` as in
    ``call_term``)."""
    with torch.no_grad():
        _, calls = record(module, (x,), ["weight"])
    if len(calls) != 1:
        raise ValueError(f"oracle.hebbian: {len(calls)} calls of the weight, expected one")
    return call_term(calls[0], rule, mask)


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """u of ``module(x)`` from the oracle's own windows (a check of its geometry): a conv sums
    each output position's input window times W; a transposed conv scatters every input
    element times W into the output."""
    with torch.no_grad():
        _, calls = record(module, (x,), ["weight"])
    (c,) = calls
    b = module.bias.detach().double() if module.bias is not None else None
    if c.kind == "linear":
        u = c.x @ c.w.t()
        return u + b if b is not None else u
    g, k, n = c.groups, tuple(c.w.shape[2:]), c.x.shape[0]
    if not c.transposed:
        cout, cig = c.w.shape[:2]
        pt = patches(c.x, k, c.stride, c.padding, c.dilation)
        sp = pt.shape[2 : 2 + len(k)]
        pt = pt.reshape(n, g, cig, -1, math.prod(k))
        wg = c.w.reshape(g, cout // g, cig, -1)
        u = torch.einsum("ngclk,gock->ngol", pt, wg).reshape(n, cout, *sp)
    else:
        cin, cog = c.w.shape[:2]
        s, d, p = c.stride, c.dilation, c.padding
        full = [(c.x.shape[2 + i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 for i in range(len(k))]
        out = list(c.u.shape[2:])
        full = [max(f, p[i] + out[i]) for i, f in enumerate(full)]  # room for output_padding
        buf = torch.zeros(n, cog * g, *full, dtype=torch.float64)
        for pos in itertools.product(*[range(i) for i in c.x.shape[2:]]):
            win = tuple(
                slice(o * s[i], o * s[i] + d[i] * (k[i] - 1) + 1, d[i]) for i, o in enumerate(pos)
            )
            for gi in range(g):
                xin = c.x[(slice(None), slice(gi * (cin // g), (gi + 1) * (cin // g)), *pos)]
                wg = c.w[gi * (cin // g) : (gi + 1) * (cin // g)].reshape(cin // g, -1)
                contrib = (xin @ wg).reshape(n, cog, *k)
                buf[(slice(None), slice(gi * cog, (gi + 1) * cog), *win)] += contrib
        u = buf[(slice(None), slice(None), *[slice(q, q + o) for q, o in zip(p, out)])]
    if b is not None:
        u = u + b.view(1, -1, *[1] * len(k))
    unbatched = x.dim() == len(k) + 1
    return u.squeeze(0) if unbatched else u
