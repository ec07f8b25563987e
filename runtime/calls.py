"""Parse functional conv/linear calls into a CallSpec: the layer's geometry, nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# func -> (spatial dims, transposed); None dims means linear
CONV_FUNCS: dict = {
    F.conv1d: (1, False),
    F.conv2d: (2, False),
    F.conv3d: (3, False),
    F.conv_transpose1d: (1, True),
    F.conv_transpose2d: (2, True),
    F.conv_transpose3d: (3, True),
}
LINEAR_FUNC = F.linear
# Function modes see ``F.multi_head_attention_forward`` as one call: MHA_FORWARD's inner linear
# calls are reached by patching F.linear for its duration (patched_linear)
MHA_FORWARD = F.multi_head_attention_forward
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


@contextlib.contextmanager
def patched_linear(handler: Callable) -> Iterator[None]:
    """Route every ``F.linear`` call to ``handler(F.linear, args, kwargs)`` while active (used
    around :data:`MHA_FORWARD`, whose inner linear calls a function mode does not see)."""
    F.linear = lambda *a, **k: handler(LINEAR_FUNC, a, k)
    try:
        yield
    finally:
        F.linear = LINEAR_FUNC


def _tup(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    return v * n if len(v) == 1 else v


@dataclass(frozen=True)
class CallSpec:
    """Geometry of one conv/linear call, with numeric (already resolved) padding."""

    kind: str  # "linear" | "conv"
    nd: int = 0
    transposed: bool = False
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    output_padding: tuple[int, ...] = ()
    groups: int = 1
    pre_pad: tuple[int, ...] = ()  # F.pad amounts for asymmetric 'same' padding

    @property
    def name(self) -> str:
        if self.kind == "linear":
            return "linear"
        return f"conv_transpose{self.nd}d" if self.transposed else f"conv{self.nd}d"

    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The plain forward of this call on (batched, pre-padded) input."""
        if self.kind == "linear":
            return LINEAR_FUNC(x, w, b)  # not F.linear: MHA patches it while running
        return torch.convolution(  # the C++ binding: cheaper to call than torch.ops.aten
            x,
            w,
            b,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding if self.transposed else (0,) * self.nd,
            self.groups,
        )

    def conv_backward(
        self,
        g: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        need: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(dL/dx, dL/dW, dL/db) of this conv call with output gradient ``g``, each only where
        ``need`` says (the vendor's backward kernels, one call)."""
        return torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            [g.shape[1]] if need[2] else None,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding if self.transposed else (0,) * self.nd,
            self.groups,
            list(need),
        )


def parse_call(func, args: tuple, kwargs: dict):
    """Return (x, weight, bias, CallSpec, unbatched) for a conv/linear call, else None."""
    if func is LINEAR_FUNC:
        names = ("input", "weight", "bias")
        a = dict(zip(names, args))
        a.update(kwargs)
        if "weight" not in a:
            return None
        return a["input"], a["weight"], a.get("bias"), CallSpec("linear"), False
    info = CONV_FUNCS.get(func)
    if info is None:
        return None
    nd, transposed = info
    a = dict(zip(_TCONV_ARGS if transposed else _CONV_ARGS, args))
    a.update(kwargs)
    x, w = a["input"], a["weight"]
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return None
    stride = _tup(a.get("stride", 1), nd)
    dilation = _tup(a.get("dilation", 1), nd)
    padding = a.get("padding", 0)
    pre_pad: tuple[int, ...] = ()
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nd
        else:  # 'same': total = d*(k-1); extra element on the right when odd (as torch does)
            total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
            if all(t % 2 == 0 for t in total):
                padding = tuple(t // 2 for t in total)
            else:
                padding = (0,) * nd
                pads: list[int] = []
                for t in reversed(total):
                    pads += [t // 2, t - t // 2]
                pre_pad = tuple(pads)
    spec = CallSpec(
        "conv",
        nd,
        transposed,
        stride,
        _tup(padding, nd),
        dilation,
        _tup(a.get("output_padding", 0), nd) if transposed else (),
        int(a.get("groups", 1)),
        pre_pad,
    )
    return x, w, a.get("bias"), spec, x.dim() == nd + 1


def units_lead(spec: CallSpec, t: torch.Tensor) -> bool:
    """Whether the weight-shaped ``t`` of this call has its output units along dim 0 (not a
    transposed conv's weight, not a 1-D weight)."""
    return (spec.kind == "linear" or not spec.transposed) and t.dim() > 1
