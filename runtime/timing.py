"""When a call's Hebbian term H is computed (``hebbian_at``), and the split timing.

H needs the call's input x and output u. Backprop keeps x anyway (for the weight gradient);
whether it keeps u depends on the next op (BatchNorm does, ReLU does not). So each call
resolves ``hebbian_at`` to one of (its ``at``):

- ``backward``: save u and compute H in the backward pass (free when u is kept anyway);
- ``forward``: compute H right away and keep only H (weight-sized) until the backward pass;
- ``block`` (the sampled mode over the batch): draw the block now, keep a copy of u's block
  (a fraction of u) and compute H from it in the backward pass.

``fast`` takes whichever keeps less memory alive between the passes (``forward``, or
``backward`` / ``block``); ``recompute`` does too, but where that is ``forward`` for a large
conv it keeps H of all but the last units and recomputes those in the backward pass
(:func:`hebbian_split`); ``auto`` is ``recompute`` on the policy's ``split_devices`` and
``fast`` elsewhere. H is added to the parameter's accumulator only when the call's backward
runs, whichever the timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghlc.graph import HebbianRule

from . import correlation, policy, sampled
from .calls import CallSpec
from .rule import hebbian_finish


def choose_at(
    hebbian_at: str,
    out_saved: bool,
    copy_out: bool,
    w_numel: int,
    out_numel: int,
    fraction: float = 1.0,
) -> str:
    """``forward``, ``backward`` or ``block`` for one call (see the module docstring);
    ``fraction``: :func:`~.sampled.block_fraction` of the call's rule."""
    if hebbian_at not in ("auto", "fast", "recompute"):
        return hebbian_at
    if out_saved and not copy_out:  # u is kept anyway
        return "backward"
    if fraction < 1.0:  # a copy of u's block against H
        return "forward" if w_numel < out_numel * fraction else "block"
    return "forward" if w_numel < out_numel else "backward"


@dataclass
class Block:
    """What the ``block`` timing keeps between the passes (:func:`~.sampled.sample_block`)."""

    x: torch.Tensor
    u: torch.Tensor


# Split timing (memory for time): large conv weights whose output backprop does not keep
# have H of the first units computed in the forward pass and kept; for the last
# ``split_units`` units only the softmax's per-position log-sum-exp is kept, and their output
# and H are recomputed a unit block at a time in the backward pass. On CUDA the peak was within
# the memory target without it, so there it would only cost time (docs/PERFORMANCE.md, 'Why
# the runtime chooses what it does').
def splits(hebbian_at: str, w: torch.Tensor) -> bool:
    """Whether ``hebbian_at`` splits a call of ``w`` that :func:`split_units` allows."""
    return hebbian_at == "recompute" or (
        hebbian_at == "auto" and w.device.type in policy.current().split_devices
    )


def split_units(spec: CallSpec, w: torch.Tensor, rule: HebbianRule) -> int:
    """How many output units of this call :func:`hebbian_split` recomputes (0: no split)."""
    pol = policy.current()
    if (
        spec.kind != "conv"
        or spec.transposed
        or spec.groups != 1
        or w.numel() < pol.split_min_numel
        or rule.competition != "softmax"
        or rule.competition_scope != "layer"
        or (rule.sample_fraction < 1.0 and rule.sample_over != "batch")
        or w.shape[0] < 2 * pol.split_units
    ):
        return 0
    return pol.split_units


@dataclass
class SplitH:
    """What :func:`hebbian_split` keeps between the passes: H of units [0, k), the
    log-sum-exp of t*u over all units at every position, and the input H is over (the
    call's input, or a view of its sampled block)."""

    h: torch.Tensor | None
    lse: torch.Tensor
    x: torch.Tensor


def hebbian_split(
    spec: CallSpec,
    x: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rule: HebbianRule,
    n_recompute: int,
) -> SplitH:
    """Forward half of the split timing: H of all units but the last ``n_recompute``
    (``hebbian_raw``'s numbers, to float32 rounding, once :func:`hebbian_split_finish`
    has added the rest)."""
    if rule.sample_fraction < 1.0:
        x, u = sampled.subsample(spec, x, u, rule.sample_fraction, rule.sample_over)
    k = w.shape[0] - n_recompute
    s = u * rule.temperature
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    y = torch.sub(s[:, :k], lse).exp_()
    del s
    # (in unit blocks where the whole weight's correlation would be: w[:k] alone may be
    # under the size limit, and one call on it is the slower)
    pol = policy.current()
    corr = (
        correlation.by_units(spec, x, w[:k], y, pol.block_units)
        if correlation.blocked(spec, w, pol) and not correlation.forward_form_pays(spec, w, y, pol)
        else correlation.weight_vjp(spec, x, w[:k], y)
    )
    h = hebbian_finish(spec, corr, y, w[:k], None if b is None else b[:k], rule)
    return SplitH(h, lse, x)


def hebbian_split_finish(
    spec: CallSpec, w: torch.Tensor, b: torch.Tensor | None, kept: SplitH, rule: HebbianRule
) -> torch.Tensor:
    """Backward half: H of the last units from their recomputed output, joined to the rest."""
    assert kept.h is not None  # set by hebbian_split, dropped only here
    n, k, x = w.shape[0], kept.h.shape[0], kept.x
    h = torch.empty_like(w, memory_format=torch.contiguous_format)
    h[:k] = kept.h
    kept.h = None
    step = correlation.units_per_block(n - k)
    for s0 in range(k, n, step):
        e = min(n, s0 + step)
        ws, bs = w[s0:e], None if b is None else b[s0:e]
        y = spec.run(x, ws, bs).mul_(rule.temperature).sub_(kept.lse).exp_()
        h[s0:e] = hebbian_finish(spec, correlation.weight_vjp(spec, x, ws, y), y, ws, bs, rule)
    return h
