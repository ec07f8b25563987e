"""The sampled mode: H from a part of each call, drawn at random every step.

``sample_over="batch"``: a contiguous block of the batch (a view; batches are shuffled by the
data loader). ``"positions"``: every n-th row of a linear layer, or for a conv a grid of
output positions of every sample, computed as the weight gradient of the equivalent strided
conv (no patches are unfolded). Every random choice goes through :func:`draw`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ghlc.graph import HebbianRule

from .calls import CallSpec


def block_fraction(rule: HebbianRule) -> float:
    """The part of a call's output the sampled mode reads: its fraction where it takes a block
    of the batch (what :func:`sample_block` keeps), 1.0 otherwise."""
    return rule.sample_fraction if rule.sample_over == "batch" else 1.0


def sample_block(
    spec: CallSpec, x: torch.Tensor, u: torch.Tensor, rule: HebbianRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled mode's block of the batch, drawn now: a view of x (which backprop keeps)
    and a copy of u's block (so that u itself need not be kept), for
    ``hebbian_raw(..., presampled=True)`` in the backward pass."""
    xs, us = subsample(spec, x, u, rule.sample_fraction, rule.sample_over)
    return xs, us.clone()


def draw(n: int) -> int:
    """A uniform integer in [0, n) from torch's generator (every random choice of the sampled
    modes; tests replace it to fix the choice)."""
    return int(torch.randint(0, n, ()))


def subsample(spec: CallSpec, x: torch.Tensor, u: torch.Tensor, frac: float, over: str = "batch"):
    """Fast approximate mode over the batch: a random contiguous block of samples (rows for
    linear), a view, so no activation is copied; batches are shuffled by the data loader.
    ``over="positions"`` for a linear layer: every n-th row (n = round(1/frac)) from a random
    offset, so every sample contributes."""
    if spec.kind == "linear":
        x, u = x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
    n = x.shape[0]
    if over == "positions" and spec.kind == "linear":
        q = min(n, grid_steps(frac, 1)[0])
        a = draw(q)
        return x[a::q], u[a::q]
    k = max(1, int(round(frac * n)))
    if k >= n:
        return x, u
    start = draw(n - k + 1)
    return x.narrow(0, start, k), u.narrow(0, start, k)


@functools.cache
def grid_steps(frac: float, nd: int) -> tuple[int, ...]:
    """Steps of the sampled grid per spatial dim: integers whose product is round(1/frac),
    as equal as they can be (the larger ones last): 0.25 in 2-D is every 2nd row and column."""
    n = max(1, round(1 / frac))

    def split(n: int, k: int) -> tuple[int, ...]:
        if k == 1:
            return (n,)
        best: tuple[int, ...] | None = None
        for d in range(1, n + 1):
            if n % d == 0:
                cand = (d, *split(n // d, k - 1))
                if best is None or max(cand) < max(best):
                    best = cand
        assert best is not None
        return best

    return split(n, nd)


@dataclass(frozen=True)
class GridDim:
    """One spatial dim of a sampled grid of output positions ``a, a+q, ...`` (``m`` of them),
    as a strided conv: input narrowed to ``[start, start+length)``, stride ``stride``,
    padding ``pad``, and ``lead`` all-zero output rows before the sampled ones. ``length``
    0: the sampled outputs read padding only."""

    q: int
    a: int
    m: int
    start: int
    length: int
    stride: int
    pad: int
    lead: int


def grid_dim(length: int, out: int, k: int, s: int, p: int, d: int, q: int, a: int) -> GridDim:
    """The strided conv whose outputs are outputs ``a, a+q, ...`` of a conv (kernel ``k``,
    stride ``s``, symmetric padding ``p``, dilation ``d``) over ``length`` input rows with
    ``out`` outputs. Output ``a+q*j`` reads input rows ``(a+q*j)*s - p + t*d``: a stride of
    ``q*s`` from row ``a*s - p``. Where the sampled outputs read more padding at the end than
    at the start, the padding is made symmetric by adding a multiple of the stride at both
    ends, which puts ``lead`` extra outputs (zero cotangent) before the sampled ones; the
    last sampled output is then the strided call's last."""
    m = (out - a + q - 1) // q
    big = q * s
    if a * s >= p:
        pad, start = 0, a * s - p
    else:
        pad, start = p - a * s, 0
    last = (m - 1) * big + d * (k - 1) - pad  # last row read, relative to start
    avail = length - start
    if last < 0 or avail <= 0:
        return GridDim(q, a, m, min(start, length), 0, big, pad, 0)
    lead = 0
    if last <= avail - 1:
        n = last + 1  # rows past the last one read are left out
    else:  # reads past the end: padding there must be real padding
        n = avail
        short = last - (avail - 1) - pad
        if short > 0:
            lead = -(-short // big)
            pad += lead * big
    assert (n + 2 * pad - d * (k - 1) - 1) // big + 1 == lead + m  # (see the docstring)
    return GridDim(q, a, m, start, n, big, pad, lead)


def sample_grid(
    spec: CallSpec, x_shape, w_shape, out_shape, frac: float, offsets: tuple[int, ...] | None = None
) -> tuple[GridDim, ...]:
    """The sampled grid of a (non-transposed, batched) conv call: steps from
    :func:`grid_steps`, offsets drawn uniformly (or given)."""
    steps = grid_steps(frac, spec.nd)
    dims = []
    for i in range(spec.nd):
        out = out_shape[2 + i]
        q = min(steps[i], out)
        a = draw(q) if offsets is None else offsets[i]
        dims.append(
            grid_dim(
                x_shape[2 + i],
                out,
                w_shape[2 + i],
                spec.stride[i],
                spec.padding[i],
                spec.dilation[i],
                q,
                a,
            )
        )
    return tuple(dims)


def grid_call(
    spec: CallSpec, x: torch.Tensor, u: torch.Tensor, grid: tuple[GridDim, ...]
) -> tuple[CallSpec, torch.Tensor, torch.Tensor]:
    """(strided spec, narrowed input, sampled outputs) of a sampled grid (views, no copies)."""
    sx = x
    index = [slice(None), slice(None)]
    for i, g in enumerate(grid):
        sx = sx.narrow(2 + i, g.start, g.length)
        index.append(slice(g.a, None, g.q))
    s = replace(spec, stride=tuple(g.stride for g in grid), padding=tuple(g.pad for g in grid))
    return s, sx, u[tuple(index)]


def grid_pad(y: torch.Tensor, grid: tuple[GridDim, ...]) -> torch.Tensor:
    """y after its ``lead`` zero rows (a copy only where there are any)."""
    pads: list[int] = []
    for g in reversed(grid):
        pads += [g.lead, 0]
    return F.pad(y, pads) if any(pads) else y
