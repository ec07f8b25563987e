"""Per-parameter accumulators: raw Hebbian terms and gradients, combined after backward.

A plastic parameter may be used by several calls (weight sharing) and several backward passes
may run before one optimiser step (micro-batches). Raw terms H and G accumulate like gradients
and are normalised only when combined, so ``.grad`` always equals ``|H_n| * sign(G)`` of the
totals since the last ``zero_grad``.
"""

from __future__ import annotations

import weakref

import torch

from .hebbian import HebbianRule, combine


class PlasticParam:
    """Accumulator and autograd hooks for one plastic parameter."""

    def __init__(self, name: str, rule: HebbianRule, layer: str = "") -> None:
        self.name = name
        self.layer = layer or name
        self.rule = rule
        self.pending: torch.Tensor | None = None  # raw H of the running backward
        self.h_acc: torch.Tensor | None = None
        self.g_acc: torch.Tensor | None = None
        self._written = None  # weakref to the .grad tensor we wrote, and its version
        self._written_version = -1
        self.param_ref = None  # weakref to the parameter our hooks sit on
        self._mark = False  # a combine is due after the running accumulation

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_written"] = d["param_ref"] = None
        return d

    def __deepcopy__(self, memo):
        new = PlasticParam.__new__(PlasticParam)
        new.__dict__.update(self.__getstate__())
        new.pending = new.h_acc = new.g_acc = None
        return new

    # ---- forward side -------------------------------------------------------------
    def arm(self, param: torch.Tensor) -> None:
        """Attach the combine hooks to ``param`` once (idempotent)."""
        if self.param_ref is not None and self.param_ref() is param:
            return
        self.param_ref = weakref.ref(param)
        param.register_hook(self._pre_accumulate)
        param.register_post_accumulate_grad_hook(self._post_accumulate)

    # ---- backward side ------------------------------------------------------------
    def add(self, h: torch.Tensor, view: tuple | None = None) -> None:
        """Add one call's raw term. ``view`` = (size, stride, offset) when the call used a
        view of the parameter (e.g. a chunk of ``in_proj_weight``), else None."""
        if view is not None:
            p = self.param_ref() if self.param_ref is not None else None
            if p is None:
                return
            full = torch.zeros_like(p)
            full.as_strided(*view).add_(h)
            h = full
        self.pending = h if self.pending is None else self.pending + h

    def _pre_accumulate(self, g: torch.Tensor) -> torch.Tensor:
        p = self.param_ref() if self.param_ref is not None else None
        h, self.pending = self.pending, None
        if p is None or h is None:
            return g
        grad = p.grad
        fresh = not (
            grad is not None and self._written is not None and self._written() is grad
            and grad._version == self._written_version and self.h_acc is not None
        )
        if fresh:
            self.h_acc, self.g_acc = h, g
        else:
            self.h_acc, self.g_acc = self.h_acc + h, self.g_acc + g
        p.grad = None  # AccumulateGrad then just stores g; we overwrite it right after
        self._mark = True
        return g

    def _post_accumulate(self, p: torch.Tensor) -> None:
        if not self._mark:
            return
        self._mark = False
        p.grad = combine(self.h_acc, self.g_acc, self.rule)
        self._written = weakref.ref(p.grad)
        self._written_version = p.grad._version
