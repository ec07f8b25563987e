"""A plain float64 reference of the GHL rule, independent of ``ghlc.runtime``.

For a plastic layer call ``u = f(x; W) + b``:

* ``y = compete(u)``: softmax(t*u) (or one-hot argmax, or u itself) over the output units,
  separately at every other position; with scope "group", within each conv group;
* ``H = sum y.x - (sum y*u)[k] W[k]`` ("oja"), or just ``sum y.x`` ("hebb");
* the weight's gradient is ``|Hn| * sign(G)`` ("grad_sign") or ``-Hn`` ("none"), where
  ``Hn = H / (max|H| + 1e-30)``.

``sum y.x`` is written out by hand: explicit patches per output position for convolutions
(padding applied with ``F.pad`` first), explicit scatter over input positions for transposed
convolutions. No autograd, no ``torch.nn.grad``, no ``convolution_backward``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ---- competition ---------------------------------------------------------------------------
def ref_compete(u: torch.Tensor, unit_dim: int, competition: str, temperature: float,
                groups: int = 1) -> torch.Tensor:
    """y from u. ``unit_dim`` is the output-unit axis; ``groups`` > 1 competes per group."""
    if competition == "none":
        return u.clone()
    v = u.movedim(unit_dim, -1)  # (..., units)
    n_units = v.shape[-1]
    v = v.reshape(*v.shape[:-1], groups, n_units // groups)  # (..., groups, units per group)
    if competition == "softmax":
        z = temperature * v
        z = z - z.max(dim=-1, keepdim=True).values
        e = torch.exp(z)
        y = e / e.sum(dim=-1, keepdim=True)
    elif competition == "hard":
        y = torch.zeros_like(v)
        winners = v.argmax(dim=-1, keepdim=True)
        y.scatter_(-1, winners, 1.0)
    else:
        raise ValueError(competition)
    return y.reshape(*y.shape[:-2], n_units).movedim(-1, unit_dim)


# ---- padding -------------------------------------------------------------------------------
def conv_pads(module) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim of a (non-transposed) conv module."""
    nd = len(module.kernel_size)
    p = module.padding
    if p == "valid":
        return [(0, 0)] * nd
    if p == "same":
        pads = []
        for d, k in zip(module.dilation, module.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(p, int):
        p = (p,) * nd
    return [(int(q), int(q)) for q in p]


def pad_input(module, x: torch.Tensor) -> torch.Tensor:
    """x (batched) padded the way the conv module pads it."""
    pads = conv_pads(module)
    flat: list[int] = []
    for left, right in reversed(pads):  # F.pad takes the last dim first
        flat += [left, right]
    if module.padding_mode == "zeros":
        return F.pad(x, flat, mode="constant", value=0.0)
    return F.pad(x, flat, mode=module.padding_mode)


# ---- per-layer forward and sum y.x ---------------------------------------------------------
def _linear(module, x):
    w = module.weight.detach().double()
    xs = x.reshape(-1, w.shape[1])  # every leading index is a sample
    u = xs @ w.t()
    if module.bias is not None:
        u = u + module.bias.detach().double()
    return xs, u, w


def _conv_patches(module, x):
    """Patches of the padded input, one per output position: dict pos -> (N, C_in, *k)."""
    xp = pad_input(module, x)
    k, s, d = module.kernel_size, module.stride, module.dilation
    out_size = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(k))]
    patches = {}
    for pos in itertools.product(*[range(o) for o in out_size]):
        index = [slice(None), slice(None)]
        for i, o in enumerate(pos):
            start = o * s[i]
            index.append(slice(start, start + d[i] * (k[i] - 1) + 1, d[i]))
        patches[pos] = xp[tuple(index)]
    return patches, out_size


def _conv_forward(module, x, w, b):
    patches, out_size = _conv_patches(module, x)
    n, g = x.shape[0], module.groups
    cout = w.shape[0]
    cig, cog = w.shape[1], cout // g
    u = torch.zeros(n, cout, *out_size, dtype=torch.float64)
    for pos, patch in patches.items():
        for grp in range(g):
            xin = patch[:, grp * cig:(grp + 1) * cig].reshape(n, -1)  # (N, cig*prod k)
            wg = w[grp * cog:(grp + 1) * cog].reshape(cog, -1)
            u[(slice(None), slice(grp * cog, (grp + 1) * cog), *pos)] = xin @ wg.t()
    if b is not None:
        u = u + b.view(1, -1, *([1] * len(out_size)))
    return u, patches


def _conv_corr(module, w, y, patches):
    """sum over samples and output positions of y[n, unit, pos] * patch[n, :, kernel]."""
    g = module.groups
    cig, cog = w.shape[1], w.shape[0] // g
    corr = torch.zeros_like(w)
    for pos, patch in patches.items():
        for grp in range(g):
            xin = patch[:, grp * cig:(grp + 1) * cig].reshape(patch.shape[0], -1)
            yg = y[(slice(None), slice(grp * cog, (grp + 1) * cog), *pos)]  # (N, cog)
            corr[grp * cog:(grp + 1) * cog] += (yg.t() @ xin).reshape(cog, *w.shape[1:])
    return corr


def _tconv_geometry(module, x):
    k, s, d = module.kernel_size, module.stride, module.dilation
    p, op = module.padding, module.output_padding
    in_size = x.shape[2:]
    full = [(in_size[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1 + op[i] for i in range(len(k))]
    out = [full[i] - 2 * p[i] for i in range(len(k))]
    return full, out


def _tconv_window(module, pos):
    """Index of the (dilated) kernel window that input position ``pos`` scatters into, in the
    uncropped output buffer."""
    k, s, d = module.kernel_size, module.stride, module.dilation
    return tuple(slice(o * s[i], o * s[i] + d[i] * (k[i] - 1) + 1, d[i]) for i, o in
                 enumerate(pos))


def _tconv_forward(module, x, w, b):
    """Transposed conv by its definition: every input element scatters W into the output."""
    n, g = x.shape[0], module.groups
    cin, cog = w.shape[0], w.shape[1]
    cig = cin // g
    full, out = _tconv_geometry(module, x)
    buf = torch.zeros(n, cog * g, *full, dtype=torch.float64)
    for pos in itertools.product(*[range(i) for i in x.shape[2:]]):
        win = _tconv_window(module, pos)
        for grp in range(g):
            xin = x[(slice(None), slice(grp * cig, (grp + 1) * cig), *pos)]  # (N, cig)
            wg = w[grp * cig:(grp + 1) * cig].reshape(cig, -1)  # (cig, cog*prod k)
            contrib = (xin @ wg).reshape(n, cog, *module.kernel_size)
            buf[(slice(None), slice(grp * cog, (grp + 1) * cog), *win)] += contrib
    crop = tuple(slice(p, p + o) for p, o in zip(module.padding, out))
    u = buf[(slice(None), slice(None), *crop)].clone()
    if b is not None:
        u = u + b.view(1, -1, *([1] * len(out)))
    return u


def _tconv_corr(module, x, w, y):
    """sum over samples and input positions of x[n, c_in, pos] * y[n, unit, pos*s + k*d - p]."""
    n, g = x.shape[0], module.groups
    cin, cog = w.shape[0], w.shape[1]
    cig = cin // g
    full, out = _tconv_geometry(module, x)
    ybuf = torch.zeros(n, cog * g, *full, dtype=torch.float64)  # y placed in uncropped coords
    crop = tuple(slice(p, p + o) for p, o in zip(module.padding, out))
    ybuf[(slice(None), slice(None), *crop)] = y
    corr = torch.zeros_like(w)
    for pos in itertools.product(*[range(i) for i in x.shape[2:]]):
        win = _tconv_window(module, pos)
        for grp in range(g):
            xin = x[(slice(None), slice(grp * cig, (grp + 1) * cig), *pos)]  # (N, cig)
            ywin = ybuf[(slice(None), slice(grp * cog, (grp + 1) * cog), *win)].reshape(n, -1)
            corr[grp * cig:(grp + 1) * cig] += (xin.t() @ ywin).reshape(cig, *w.shape[1:])
    return corr


# ---- the rule ------------------------------------------------------------------------------
def ref_hebbian(module: nn.Module, x: torch.Tensor, competition: str = "softmax",
                temperature: float = 1.0, local_rule: str = "oja",
                scope: str = "layer", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Un-normalised H (float64, the weight's shape) of one call ``module(x)``. ``mask``
    (0/1, the output's shape without the unit axis: (rows,) for a linear layer's flattened
    rows, (N, *positions) for a batched conv) keeps only those terms of both sums (the
    sampled mode)."""
    x = x.detach().double()
    w = module.weight.detach().double()
    b = module.bias.detach().double() if module.bias is not None else None
    if isinstance(module, nn.Linear):
        xs, u, w = _linear(module, x)
        y = ref_compete(u, 1, competition, temperature)
        if mask is not None:
            y = y * mask.double().view(-1, 1)
        corr = y.t() @ xs
        s = (y * u).sum(dim=0)  # per output unit
        decay = s.view(-1, 1) * w
    elif isinstance(module, CONV + CONV_T):
        nd = len(module.kernel_size)
        if x.dim() == nd + 1:  # unbatched
            x = x.unsqueeze(0)
        transposed = isinstance(module, CONV_T)
        if transposed:
            u = _tconv_forward(module, x, w, b)
        else:
            u, patches = _conv_forward(module, x, w, b)
        groups = module.groups if scope == "group" else 1
        y = ref_compete(u, 1, competition, temperature, groups)
        if mask is not None:
            y = y * mask.double().unsqueeze(1)
        corr = _tconv_corr(module, x, w, y) if transposed else _conv_corr(module, w, y, patches)
        s = (y * u).sum(dim=[i for i in range(u.dim()) if i != 1])  # per output unit
        if transposed:  # weight (C_in, C_out/g, *k): unit of [c, j] is group(c)*(C_out/g) + j
            g, cin, cog = module.groups, w.shape[0], w.shape[1]
            s_w = torch.stack([s[(c // (cin // g)) * cog:(c // (cin // g) + 1) * cog]
                               for c in range(cin)])
            decay = s_w.view(cin, cog, *([1] * nd)) * w
        else:
            decay = s.view(-1, *([1] * (w.dim() - 1))) * w
    else:
        raise TypeError(f"no reference for {type(module).__name__}")
    if local_rule == "hebb":
        return corr
    if local_rule != "oja":
        raise ValueError(local_rule)
    return corr - decay


def ref_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """u of one call, computed by the reference's own loops (for self-checks)."""
    x = x.detach().double()
    w = module.weight.detach().double()
    b = module.bias.detach().double() if module.bias is not None else None
    if isinstance(module, nn.Linear):
        return _linear(module, x)[1].reshape(*x.shape[:-1], w.shape[0])
    nd = len(module.kernel_size)
    unbatched = x.dim() == nd + 1
    xb = x.unsqueeze(0) if unbatched else x
    if isinstance(module, CONV_T):
        u = _tconv_forward(module, xb, w, b)
    else:
        u = _conv_forward(module, xb, w, b)[0]
    return u.squeeze(0) if unbatched else u


def ref_normalise(h: torch.Tensor, normalisation: str = "layer", module=None) -> torch.Tensor:
    """H / max|H| over the layer, or over each output unit (plain loops over the units)."""
    if normalisation == "layer":
        return h / (h.abs().max() + 1e-30)
    if normalisation != "unit":
        raise ValueError(normalisation)
    out = torch.empty_like(h)
    if not isinstance(module, CONV_T):  # units along dim 0
        for k in range(h.shape[0]):
            out[k] = h[k] / (h[k].abs().max() + 1e-30)
        return out
    g, cig, cog = module.groups, h.shape[0] // module.groups, h.shape[1]
    for gi in range(g):  # weight (C_in, C_out/g, *k): unit (gi, j) owns rows of group gi, col j
        for j in range(cog):
            block = h[gi * cig:(gi + 1) * cig, j]
            out[gi * cig:(gi + 1) * cig, j] = block / (block.abs().max() + 1e-30)
    return out


def ref_ghl_grad(h_raw: torch.Tensor, g: torch.Tensor, global_signal: str = "grad_sign",
                 normalisation: str = "layer", module=None):
    """The plastic weight's gradient from raw H and the backprop gradient G."""
    hn = ref_normalise(h_raw.double(), normalisation, module)
    if global_signal == "none":
        return -hn
    if global_signal != "grad_sign":
        raise ValueError(global_signal)
    return hn.abs() * torch.sign(g.double())
