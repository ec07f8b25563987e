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
would keep adding).
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ghlc.errors import RuntimeGHLError
from ghlc.graph import HebbianRule

from .hebbian import ROWS, Layout, combine

# Weights at least this large (elements) get the in-call combine when it is safe (see
# PlasticParam.can_fuse): one weight-sized buffer fewer at the step's peak.
FUSE_MIN_NUMEL = 1 << 20
# Devices where the in-call combine is used. On CUDA (H100) it measured slower (then eight
# smaller weight-gradient kernels instead of one: ResNet-18 in a CUDA graph 1.116 -> 1.199 x
# floor) for no lower peak (the peak is elsewhere there), so CUDA combines after backward.
FUSE_DEVICES = {"cpu"}
# Devices where a CUDA-graph step captured with stack_weight_grads=True has each plain conv
# compute backprop's weight gradient and the Hebbian correlation in one weight-gradient call,
# the two cotangents stacked (hebbian.stacked_wgrads). On an H100: ResNet-18's graph step
# 1.057 -> 0.948 x floor, peak memory 1.018 -> 1.089 x backprop (so opt-in); on CPU a
# stacked call was slower.
STACK_DEVICES = {"cuda"}
# Stacking only weights under this many elements (None: every stackable conv). The stacked
# call holds twice the weight and a copy of g next to H; leaving the large weights out may
# keep most of the time saved at a lower peak (a CPU emulation of the captured step:
# 1.061 -> 1.044 x backprop at 2**20). Not yet measured on a GPU: bench/step.py's
# ghlc_stack20_graph does.
STACK_MAX_NUMEL: int | None = None


def fuse_sized(t: torch.Tensor) -> bool:
    """A weight (or its gradient) large enough for the in-call combine, on a device that uses
    it."""
    return t.numel() >= FUSE_MIN_NUMEL and t.device.type in FUSE_DEVICES


_BY_PARAM: dict[int, weakref.ref] = {}  # id(param) -> PlasticParam, for the step hook
# Whether a ghlc.GradScaler was made (float16 autocast then does not warn about torch's)
SCALER_IN_USE = False
_STEP_HOOK = None


def _after_step(optimizer, args, kwargs) -> None:
    """Global optimiser post-step hook: release the raw totals of the stepped parameters."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if (st := _site_of(p)) is not None:
                st.after_step()


def _site_of(p: torch.Tensor) -> PlasticParam | None:
    ref = _BY_PARAM.get(id(p))
    st = ref() if ref is not None else None
    return st if st is not None and st.param_ref is not None and st.param_ref() is p else None


def is_plastic(p: torch.Tensor) -> bool:
    """Whether ``p`` is a plastic parameter of a prepared model (its gradient is ghlc's)."""
    return _site_of(p) is not None


def _register_step_hook() -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_after_step)


class PlasticParam:
    """Accumulator and autograd hooks for one plastic parameter."""

    def __init__(self, name: str, rule: HebbianRule, layer: str = "",
                 accumulation: str = "auto", *, global_signal: str = "grad_sign") -> None:
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
        self._written = None  # weakref to the .grad tensor we wrote, and its version
        self._written_version = -1
        self.param_ref = None  # weakref to the parameter our hooks sit on
        self.layout: Layout = ROWS  # where the output units lie in the weight
        self.direct = True  # the calls use the parameter itself (not a computed weight)
        self.calls = 0  # plastic calls since the last backward reached the parameter
        self.single_use: bool | None = None  # seen: G comes from one call, nothing else
        self._returned = None  # the weight gradient our call returned, and its version
        self._returned_version = -1
        self._fused = False  # that gradient is already the combination (in-call combine)
        self._mark = False  # the .grad stored by the running accumulation is ours

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_written"] = d["param_ref"] = d["_returned"] = None
        d["calls"], d["_fused"] = 0, False
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
        for k in [k for k, r in _BY_PARAM.items() if r() is None]:
            del _BY_PARAM[k]
        _BY_PARAM[id(param)] = weakref.ref(self)
        _register_step_hook()

    def after_step(self) -> None:
        """An optimiser stepped on the parameter: drop the raw totals; in ``auto`` mode stop
        keeping them unless this step accumulated several backward passes."""
        if self.accumulation == "auto" and not self._accumulated:
            self.keep_totals = False
        self._accumulated = False
        self._stepped = True
        self.h_acc = self.g_acc = None

    def note_call(self) -> None:
        self.calls += 1

    # ---- backward side ------------------------------------------------------------
    def can_fuse(self, w: torch.Tensor) -> bool:
        """May this backward combine H and G inside the call (chunked, no full G buffer)?
        Only on FUSE_DEVICES, when the parameter is known to get its gradient from this one
        call (checked on an earlier step), no raw totals are kept and no accumulation is under
        way."""
        if not (self.direct and self.single_use and self.calls == 1 and fuse_sized(w)):
            return False
        if self.keep_totals or self.accumulation == "always":
            return False
        p = self.param_ref() if self.param_ref is not None else None
        return p is not None and not self._accumulating(p)

    def returned(self, gw: torch.Tensor, fused: bool) -> None:
        """The call's weight gradient; kept (until the parameter's hook) only while single
        use is being checked or when it is already the combination. Holding it otherwise
        would stop autograd summing a shared weight's gradients in place."""
        if fused or (self.single_use is None and self.direct and fuse_sized(gw)):
            self._returned, self._returned_version, self._fused = gw, gw._version, fused

    def _accumulating(self, p: torch.Tensor) -> bool:
        grad = p.grad
        return (grad is not None and self._written is not None and self._written() is grad
                and grad._version == self._written_version and not self._stepped)

    def add(self, h: torch.Tensor, view: tuple | None = None, layout: Layout = ROWS) -> None:
        """Add one call's raw term. ``view`` = (size, stride, offset) when the call used a
        view of the parameter (e.g. a chunk of ``in_proj_weight``), else None; ``layout`` =
        (transposed, groups) of the call, for per-unit normalisation."""
        self.layout = layout
        if view is not None:
            p = self.param_ref() if self.param_ref is not None else None
            if p is None:
                return
            full = torch.zeros_like(p)
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
        fused, self._fused = self._fused, False
        ours = ret is not None and g is ret and g._version == self._returned_version
        if ret is not None:  # single use was being checked
            if not ours:
                self.single_use = False  # other uses add to G: always combine here
            elif calls == 1 and self.single_use is None:
                self.single_use = True
        if fused:
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
        if p is None or h is None:
            return g
        accumulating = self._accumulating(p)
        self._stepped = False
        if accumulating:
            if self.h_acc is None:
                raise RuntimeGHLError(
                    f"layer {self.layer!r}: this backward pass adds to the previous one's "
                    "gradient, but ghlc stopped keeping raw Hebbian totals after seeing one "
                    "backward pass per optimiser step; use GHLConfig(accumulation='always') "
                    "when gradient accumulation starts later in training"
                )
            self._accumulated = True
            self.keep_totals = True
            self.h_acc, self.g_acc = self.h_acc.add_(h), self.g_acc + g
            out = combine(self.h_acc, self.g_acc, self.rule, layout=self.layout,
                          global_signal=self.global_signal)
        elif self.keep_totals or self.accumulation == "always":
            self.h_acc, self.g_acc = h, g
            out = combine(h, g, self.rule, layout=self.layout,
                          global_signal=self.global_signal)
        else:
            self.h_acc = self.g_acc = None
            out = combine(h, g, self.rule, inplace=True, layout=self.layout,
                          global_signal=self.global_signal)
        p.grad = None  # AccumulateGrad then stores the combined gradient as is
        self._mark = True
        return out

    def _post_accumulate(self, p: torch.Tensor) -> None:
        if not self._mark:
            return
        self._mark = False
        self._written = weakref.ref(p.grad)
        self._written_version = p.grad._version
