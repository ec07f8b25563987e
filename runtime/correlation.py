"""The correlation sum y.x of one call: the call's weight gradient with cotangent ``cot``.

Several exact ways compute it, each a function ``(spec, x, w, cot) -> Tensor`` giving the same sums:
the vendor's weight-gradient call, the same call on blocks of output units (unit blocks), a
forward conv over the transposed operands (the forward form), and for Linear one matmul.
:func:`candidates` lists the ways that are valid for a call; :func:`choose` picks one: the
fastest, timed on the real operands at the first step (``measure.py``), or the policy's static
thresholds (:func:`static_choice`) where measuring is off. (The stacked call, backprop's dL/dW
and the correlation in one weight-gradient call, is in ``stacked.py``.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import measure, policy
from .calls import CallSpec
from .policy import DispatchPolicy

Way = Callable[[CallSpec, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- the ways ------------------------------------------------------------------------------
def matmul(spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """A Linear call's weight gradient: one matmul over every row of the batch."""
    return cot.reshape(-1, cot.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def vendor(spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """A conv's weight gradient from the vendor's weight-gradient kernel (any conv)."""
    gw = spec.conv_backward(cot, x, w, (False, True, False))[1]
    assert gw is not None
    return gw


def unit_blocks(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor
) -> torch.Tensor:
    """A plain conv's weight gradient, the policy's ``block_units`` output units a call."""
    return by_units(spec, x, w, cot, policy.current().block_units)


def by_units(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor, units: int
) -> torch.Tensor:
    """A plain conv's weight gradient with cotangent ``cot``, ``units`` output units a call."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    n = w.shape[0]
    for s in range(0, n, units):
        e = min(n, s + units)
        out[s:e] = vendor(spec, x, w[s:e], cot.narrow(1, s, e - s))
    return out


def forward_form(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor
) -> torch.Tensor:
    """A plain conv's weight gradient as forward convs: batch and channels swapped, the
    cotangent as the kernel. dW[o, c, i] = sum_{n, p} cot[n, o, p] xpad[n, c, s*p + d*i] is a
    conv of xpad^T (channels n) with kernel cot^T (dilation s), output stride d, cropped to
    the weight's extent and written in the weight's layout; ``block_units`` output units a
    call, so that the conv's (C_in, C_out) result and the written gradient coexist for one
    unit block only."""
    out = torch.empty_like(w, dtype=cot.dtype)
    xt, k, n = x.transpose(0, 1), w.shape[2:], w.shape[0]
    crop = (slice(None), slice(None), *(slice(0, m) for m in k))
    units = policy.current().block_units
    for s in range(0, n, units):
        e = min(n, s + units)
        r = torch.convolution(
            xt,
            cot.narrow(1, s, e - s).transpose(0, 1),
            None,
            spec.dilation,
            spec.padding,
            spec.stride,
            False,
            (0,) * spec.nd,
            1,
        )
        out[s:e].copy_(r[crop].transpose(0, 1))
    return out


# ---- which ways apply, and which is taken --------------------------------------------------
def plain(spec: CallSpec) -> bool:
    """A conv with no groups, not transposed: its weight gradient splits by output unit."""
    return spec.kind == "conv" and not spec.transposed and spec.groups == 1


def _forward_form_valid(spec: CallSpec, w: torch.Tensor) -> bool:
    """The forward form's structure: a plain conv, stride and dilation 1 and no kernel dim of
    1 (else the form has one output position per weight element and never pays)."""
    return (
        plain(spec)
        and all(k > 1 for k in w.shape[2:])
        and all(s == 1 for s in spec.stride)
        and all(d == 1 for d in spec.dilation)
    )


def candidates(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor
) -> dict[str, Way]:
    """The exact ways of computing this call's correlation, by name."""
    if spec.kind == "linear":
        return {"matmul": matmul}
    ways: dict[str, Way] = {"vendor": vendor}
    if plain(spec) and w.shape[0] > policy.current().block_units:
        ways["unit_blocks"] = unit_blocks
    if _forward_form_valid(spec, w) and cot.shape[0] * cot.shape[2:].numel() > 0:
        ways["forward_form"] = forward_form
    return ways


def forward_form_pays(
    spec: CallSpec, w: torch.Tensor, cot: torch.Tensor, pol: DispatchPolicy
) -> bool:
    """The policy's static rule for the forward form: small-output convs with many channels
    and enough multiply-adds, on ``forward_form_devices`` (docs/PERFORMANCE.md, 'Why the
    runtime chooses what it does')."""
    return (
        _forward_form_valid(spec, w)
        and cot.device.type in pol.forward_form_devices
        and min(w.shape[0], w.shape[1]) >= pol.forward_form_min_channels
        and cot.numel() * w.shape[1:].numel() >= pol.forward_form_min_macs
        and 0 < cot.shape[0] * cot.shape[2:].numel() <= pol.forward_form_max_reduction
    )


def blocked(spec: CallSpec, w: torch.Tensor, pol: DispatchPolicy) -> bool:
    """The policy's static rule for unit blocks: large plain conv weights on
    ``blocked_devices`` (docs/PERFORMANCE.md, 'Why the runtime chooses what it does')."""
    return (
        plain(spec)
        and w.shape[0] > pol.block_units
        and w.numel() >= pol.blocked_min_numel
        and w.device.type in pol.blocked_devices
    )


def static_choice(spec: CallSpec, w: torch.Tensor, cot: torch.Tensor, pol: DispatchPolicy) -> str:
    """The way today's thresholds in ``pol`` take for this call."""
    if spec.kind == "linear":
        return "matmul"
    if forward_form_pays(spec, w, cot, pol):
        return "forward_form"
    return "unit_blocks" if blocked(spec, w, pol) else "vendor"


def choose(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor, *, as_forward: bool = True
) -> str:
    """The way this call's correlation is computed: where the policy's ``measure`` is on and
    several ways apply, the fastest of them timed on these operands at their first use
    (``measure.py``; cached per shapes, dtype, layout and threads), else the static choice.
    ``as_forward=False`` (backprop's own dL/dW) leaves the forward form out."""
    return _pick(spec, x, w, cot, as_forward)[0]


def _pick(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor, as_forward: bool
) -> tuple[str, Way]:
    """(name, function) of :func:`choose`'s way."""
    pol = policy.current()
    ways = candidates(spec, x, w, cot)
    static = static_choice(spec, w, cot, pol)
    if not as_forward:
        ways.pop("forward_form", None)
        if static == "forward_form":
            static = "unit_blocks" if blocked(spec, w, pol) else "vendor"
    if len(ways) < 2 or not pol.measure:
        return static, ways[static]
    op = "correlation" if as_forward else "weight_grad"
    way = measure.choose(
        op,
        (*measure.operand_key(x, w, cot), spec),
        {n: functools.partial(f, spec, x, w, cot) for n, f in ways.items()},
        static,
    )
    return way, ways[way]


def weight_vjp(
    spec: CallSpec, x: torch.Tensor, w: torch.Tensor, cot: torch.Tensor, *, as_forward: bool = True
) -> torch.Tensor:
    """sum over uses of cot (x) x: the weight gradient of the call with cotangent ``cot``, the
    way :func:`choose` picks. ``as_forward=False`` is for backprop's own dL/dW, which ghlc
    computes with the weight-gradient kernel, as backprop does (unit blocks allowed)."""
    return _pick(spec, x, w, cot, as_forward)[1](spec, x, w, cot)


def weight_grad_units(
    spec: CallSpec, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: int, e: int
) -> torch.Tensor:
    """dL/dW for output units s..e-1 only."""
    if spec.kind == "linear":
        g2 = g.reshape(-1, g.shape[-1])[:, s:e]
        return g2.t() @ x.reshape(-1, x.shape[-1])
    return weight_vjp(spec, x, w[s:e], g.narrow(1, s, e - s), as_forward=False)


def units_per_block(n: int) -> int:
    """Output units per unit block where a weight of ``n`` units is worked on a unit block at
    a time (the in-call combine, the split timing's recomputed units): at most the policy's
    ``block_units``, at least two blocks."""
    return max(1, min(policy.current().block_units, -(-n // 2)))
