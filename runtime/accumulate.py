"""Per-parameter accumulators: raw Hebbian terms and gradients, combined after backward.

A plastic parameter may be used by several calls (weight sharing) and several backward passes
may run before one optimiser step (micro-batches). Raw terms H and G accumulate like gradients
and are normalised only when combined, so ``.grad`` always equals ``|H_n| * sign(G)`` of the
totals since the last ``zero_grad`` or optimiser step.

Keeping the raw totals costs two weight-sized buffers per plastic layer. With
``accumulation="auto"`` they are kept until the first optimiser step; if no backward pass was
accumulated onto another by then, later steps combine in place and keep nothing (an
accumulation starting later raises a clear error). ``"always"`` keeps them every step. A
backward pass after ``step()`` without ``zero_grad()`` starts a new total (plain backprop
would keep adding). A large weight used by one call alone may instead have its gradient
combined inside that call's backward, a unit block at a time (:func:`combine_in_call`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ghlc.errors import RuntimeGHLError
from ghlc.graph import HebbianRule

from . import fused, policy
from .calls import CallSpec
from .correlation import units_per_block, weight_grad_units
from .rule import UNITS_LEAD, UnitAxes, combine, scale_of
from .status import STATUS


def in_call_sized(t: torch.Tensor) -> bool:
    """A weight (or its gradient) large enough for the in-call combine, on a device that uses
    it (the policy's ``in_call_combine_min_numel`` and ``in_call_combine_devices``: one
    weight-sized buffer fewer at the step's peak; docs/PERFORMANCE.md, 'Why the runtime
    chooses what it does')."""
    pol = policy.current()
    return (
        t.numel() >= pol.in_call_combine_min_numel and t.device.type in pol.in_call_combine_devices
    )


def splits_by_unit(spec: CallSpec) -> bool:
    """Calls whose weight gradient splits by output unit along the weight's dim 0."""
    return spec.kind == "linear" or (not spec.transposed and spec.groups == 1)


def combine_in_call(
    spec: CallSpec,
    g: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    rule: HebbianRule,
    units: int | None = None,
    global_signal: str = "grad_sign",
) -> torch.Tensor:
    """``combine(h, dL/dW, rule, inplace=True)`` for a weight used by this call alone, with
    dL/dW computed a unit block at a time (``units`` per block, default
    ``correlation.units_per_block``): the full gradient never exists, so the step needs most
    of a weight-sized buffer fewer (H becomes the gradient). The pure Hebbian rule
    (``global_signal="none"``) needs no dL/dW at all."""
    if global_signal == "none":
        return combine(h, None, rule, inplace=True)
    a = h.abs_()
    scale = scale_of(a, rule, UNITS_LEAD, nonneg=True)
    n = w.shape[0]
    step = units or units_per_block(n)
    for s in range(0, n, step):
        e = min(n, s + step)
        sc = scale if scale.dim() == 0 else scale[s:e]
        fused.scaled_sign_(a[s:e], weight_grad_units(spec, g, x, w, s, e), sc)
    return a


def _after_step(optimizer, args, kwargs) -> None:
    """Global optimiser post-step hook: release the raw totals of the stepped parameters."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if (st := _site_of(p)) is not None:
                st.after_step()


def _site_of(p: torch.Tensor) -> PlasticParam | None:
    ref = STATUS.by_param.get(id(p))
    st = ref() if ref is not None else None
    return st if st is not None and st.param_ref is not None and st.param_ref() is p else None


def is_plastic(p: torch.Tensor) -> bool:
    """Whether ``p`` is a plastic parameter of a prepared model (its gradient is ghlc's)."""
    return _site_of(p) is not None


def _register_step_hook() -> None:
    if STATUS.step_hook is None:
        STATUS.step_hook = register_optimizer_step_post_hook(_after_step)


def _missing_term_message(layer: str) -> str:
    return (
        f"layer {layer!r}: its weight's gradient arrived without the Hebbian term of its "
        "plastic call, so GHL would silently be plain backprop here (a use ghlc does not "
        "handle, or its output did not reach the loss while the weight got a gradient "
        "elsewhere); please report the model"
    )


def _no_totals_message(layer: str) -> str:
    return (
        f"layer {layer!r}: this backward pass adds to the previous one's gradient, but ghlc "
        "stopped keeping raw Hebbian totals after seeing one backward pass per optimiser "
        "step; use GHLConfig(accumulation='always') when gradient accumulation starts later "
        "in training"
    )


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A cheap summary of a gradient that changes when it is zeroed or rewritten."""
    return torch.linalg.vector_norm(t.detach())


class PlasticParam:
    """Accumulator and autograd hooks for one plastic parameter."""

    def __init__(
        self,
        name: str,
        rule: HebbianRule,
        layer: str = "",
        accumulation: str = "auto",
        *,
        global_signal: str = "grad_sign",
    ) -> None:
        self.name = name  # the parameter's name
        self.layer = layer or name  # the owning module's path
        self.rule = rule
        self.global_signal = global_signal  # "grad_sign" (GHL) | "none" (pure Hebbian)
        self.accumulation = accumulation
        self.keep_totals = True  # until a step shows one backward per step ("auto")
        self._accumulated = False  # a backward was added onto another since the last step
        self._stepped = False  # an optimiser step came after the .grad we wrote
        self.pending: torch.Tensor | None = None  # raw H of the running backward
        self.h_acc: torch.Tensor | None = None
        self.g_acc: torch.Tensor | None = None
        self._written: weakref.ref[torch.Tensor] | None = None  # the .grad we wrote
        self._written_version = -1  # and its version
        self.param_ref: weakref.ref[torch.Tensor] | None = None  # the parameter our hooks sit on
        self.axes: UnitAxes = UNITS_LEAD  # where the output units lie in the weight
        self.direct = True  # the calls use the parameter itself (not a computed weight)
        self.calls = 0  # plastic calls since the last backward reached the parameter
        self.single_use: bool | None = None  # seen: G comes from one call, nothing else
        self._returned: torch.Tensor | None = None  # the weight gradient our call returned
        self._returned_version = -1  # and its version
        self._in_call = False  # that gradient is already the combination (in-call combine)
        self._mark = False  # the .grad stored by the running accumulation is ours
        # Under DistributedDataParallel (set by each training forward, see distributed.py):
        # None (one process), "ghlc" (ghlc's comm hook combines) or "foreign" (refused).
        self.ddp: str | None = None
        self.h_local: torch.Tensor | None = None  # this process's raw H since the last sync
        self.h_red: torch.Tensor | None = None  # the reduced totals of the last sync, kept
        self.g_red: torch.Tensor | None = None  # (like h_acc, g_acc) for accumulation
        self._synced = False  # the last backward synchronised (.grad is the combination)
        self._add_reduced = False  # the next sync adds h_red, g_red to the reduced terms
        self._fingerprint: torch.Tensor | None = None  # of .grad as the last backward left it
        self.shards: Any = None  # under FSDP2: the model's fsdp.Shards

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_written"] = d["param_ref"] = d["_returned"] = None
        d["calls"], d["_in_call"] = 0, False
        d["h_local"] = d["h_red"] = d["g_red"] = d["_fingerprint"] = d["shards"] = None
        d["ddp"] = None
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
        by_param = STATUS.by_param
        for k in [k for k, r in by_param.items() if r() is None]:
            del by_param[k]
        by_param[id(param)] = weakref.ref(self)
        _register_step_hook()

    def after_step(self) -> None:
        """An optimiser stepped on the parameter: drop the raw totals; in ``auto`` mode stop
        keeping them unless this step accumulated several backward passes."""
        if self.accumulation == "auto" and not self._accumulated:
            self.keep_totals = False
        self._accumulated = False
        self._stepped = True
        self.h_acc = self.g_acc = self.h_red = self.g_red = None

    def note_call(self) -> None:
        self.calls += 1

    # ---- backward side ------------------------------------------------------------
    def can_combine_in_call(self, w: torch.Tensor) -> bool:
        """May this backward combine H and G inside the call (chunked, no full G buffer)?
        Only where :func:`in_call_sized`, when the parameter is known to get its gradient
        from this one call (checked on an earlier step), no raw totals are kept and no
        accumulation is under way."""
        if self.ddp is not None:  # the combination waits for the reduced terms
            return False
        if not (self.direct and self.single_use and self.calls == 1 and in_call_sized(w)):
            return False
        if self.keep_totals or self.accumulation == "always":
            return False
        p = self.param_ref() if self.param_ref is not None else None
        return p is not None and not self._accumulating(p)

    def returned(self, gw: torch.Tensor, in_call: bool) -> None:
        """The call's weight gradient; kept (until the parameter's hook) only while single
        use is being checked or when it is already the combination. Holding it otherwise
        would stop autograd summing a shared weight's gradients in place."""
        if self.ddp is not None:
            return
        if in_call or (self.single_use is None and self.direct and in_call_sized(gw)):
            self._returned, self._returned_version, self._in_call = gw, gw._version, in_call

    def _accumulating(self, p: torch.Tensor) -> bool:
        grad = p.grad
        return (
            grad is not None
            and self._written is not None
            and self._written() is grad
            and grad._version == self._written_version
            and not self._stepped
        )

    def add(self, h: torch.Tensor, view: tuple | None = None, axes: UnitAxes = UNITS_LEAD) -> None:
        """Add one call's raw term. ``view`` = (size, stride, offset) when the call used a
        view of the parameter (e.g. a chunk of ``in_proj_weight``), else None; ``axes`` =
        (transposed, groups) of the call, for per-unit normalisation."""
        self.axes = axes
        if self.shards is not None:  # under FSDP2: combined at the end of the backward
            self.shards.queue()
        if view is not None:
            p = self.param_ref() if self.param_ref is not None else None
            if p is None:
                return
            full = (  # (an FSDP2-sharded p: the full, unsharded shape)
                torch.zeros_like(p)
                if self.shards is None
                else torch.zeros(p.shape, dtype=h.dtype, device=h.device)
            )
            full.as_strided(*view).add_(h)
            h = full
        self.pending = h if self.pending is None else self.pending.add_(h)

    def _pre_accumulate(self, g: torch.Tensor) -> torch.Tensor:
        """Runs once all uses of the parameter have contributed G and H: returns the combined
        gradient, which autograd then stores as ``.grad`` (we clear ``.grad`` first)."""
        p = self.param_ref() if self.param_ref is not None else None
        h, self.pending = self.pending, None
        calls, self.calls = self.calls, 0
        ret, self._returned = self._returned, None
        in_call, self._in_call = self._in_call, False
        if self.ddp is not None and p is not None:
            return self._pre_accumulate_ddp(p, g, h, calls)
        ours = ret is not None and g is ret and g._version == self._returned_version
        if ret is not None:  # single use was being checked
            if not ours:
                self.single_use = False  # other uses add to G: always combine here
            elif calls == 1 and self.single_use is None:
                self.single_use = True
        if in_call:
            if not ours:
                raise RuntimeGHLError(
                    f"layer {self.layer!r}: its weight got a gradient from outside its call "
                    "this step, after ghlc had combined the call's gradient in place; use "
                    "GHLConfig(accumulation='always') for a model whose weight use changes "
                    "between steps"
                )
            self._stepped = False
            self.h_acc = self.g_acc = None
            if p is not None:
                p.grad = None
                self._mark = True
            return g
        if p is None:
            return g
        if h is None:
            if calls:  # a plastic call ran, yet its Hebbian term never reached the weight
                raise RuntimeGHLError(_missing_term_message(self.layer))
            return g  # no plastic call since the last backward: a plain use (documented)
        accumulating = self._accumulating(p)
        self._stepped = False
        if accumulating:
            if self.h_acc is None:
                raise RuntimeGHLError(_no_totals_message(self.layer))
            assert self.g_acc is not None  # kept together with h_acc
            self._accumulated = True
            self.keep_totals = True
            self.h_acc, self.g_acc = self.h_acc.add_(h), self.g_acc + g
            out = combine(
                self.h_acc, self.g_acc, self.rule, axes=self.axes, global_signal=self.global_signal
            )
        elif self.keep_totals or self.accumulation == "always":
            self.h_acc, self.g_acc = h, g
            out = combine(h, g, self.rule, axes=self.axes, global_signal=self.global_signal)
        else:
            self.h_acc = self.g_acc = None
            out = combine(
                h, g, self.rule, inplace=True, axes=self.axes, global_signal=self.global_signal
            )
        p.grad = None  # AccumulateGrad then stores the combined gradient as is
        self._mark = True
        return out

    # ---- under DistributedDataParallel with ghlc's comm hook (distributed.py) -------------
    def _pre_accumulate_ddp(
        self, p: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None, calls: int
    ) -> torch.Tensor:
        """Keep this process's raw H; let autograd store the raw G, which DDP then reduces.
        The comm hook combines the reduced terms (:meth:`combine_reduced`). Whether this
        backward adds to the last one's total is read from ``.grad``: there, not stepped on,
        and unchanged since that backward left it (its fingerprint; ``zero_grad()`` with
        ``set_to_none=False`` changes it)."""
        if self.ddp == "foreign":
            raise RuntimeGHLError(
                f"layer {self.layer!r}: the model runs inside torch's DistributedDataParallel "
                "without ghlc's communication hook, which would average each process's own "
                "normalised |H|*sign(G) (not the rule); wrap the model with "
                "ghlc.distributed.ddp(model, ...) or register ghlc.distributed.comm_hook"
            )
        if h is None and calls:
            raise RuntimeGHLError(_missing_term_message(self.layer))
        fp = self._fingerprint
        grad = p.grad
        adds = (
            grad is not None
            and not self._stepped
            and fp is not None
            and torch.equal(_fingerprint(grad), fp)
        )
        self._stepped = False
        if adds and self._synced:  # .grad is the last sync's combination: continue its totals
            if self.h_red is None:
                raise RuntimeGHLError(_no_totals_message(self.layer))
            self._accumulated = self._add_reduced = True
            self.h_local = h
            p.grad = None  # DDP reduces this backward's G; the hook adds the kept totals
        elif adds:  # no_sync() accumulation: .grad is this process's raw G total
            if h is not None:
                self.h_local = h if self.h_local is None else self.h_local.add_(h)
        else:  # a new total
            self.h_local, self._add_reduced = h, False
            self.h_red = self.g_red = None
            p.grad = None
        self._synced = False
        return g

    def take_local(self) -> torch.Tensor | None:
        """This process's raw H total, handed to the comm hook (which reduces it)."""
        h, self.h_local = self.h_local, None
        return h

    def combine_reduced(self, h: torch.Tensor, g: torch.Tensor, has_h: bool) -> torch.Tensor:
        """The gradient from the terms summed over processes (``g``: DDP's mean of G);
        ``has_h``: some process ran a plastic call (else ``g``, the plain gradient)."""
        if self._add_reduced:
            assert self.h_red is not None and self.g_red is not None
            h, g, has_h = h + self.h_red, g + self.g_red, True
            self._add_reduced = False
        if self.keep_totals or self.accumulation == "always":
            self.h_red, self.g_red = h.clone(), g.clone()
        out = (
            combine(h, g, self.rule, axes=self.axes, global_signal=self.global_signal)
            if has_h
            else g
        )
        self._synced = True
        self._fingerprint = _fingerprint(out)
        return out

    def _post_accumulate(self, p: torch.Tensor) -> None:
        if self.ddp is not None:
            assert p.grad is not None  # AccumulateGrad has just stored it
            self._fingerprint = _fingerprint(p.grad)
            return
        if not self._mark:
            return
        self._mark = False
        assert p.grad is not None  # AccumulateGrad has just stored it
        self._written = weakref.ref(p.grad)
        self._written_version = p.grad._version
