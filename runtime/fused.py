"""Fused kernels for the rule's elementwise and reduction steps.

On a GPU a GHL step is many small kernels: the channel softmax alone is five passes over the
layer's output. Here the softmax is one hand-written Triton kernel (``triton_softmax.py``),
and Oja's decay and the sign combination are ``torch.compile``d into two kernels each, with
no weight-sized temporary. Each function has an eager twin with the same formula (the
reference; tests compare them).

A compiled call costs more CPU time than the kernels it saves in an eager CUDA step
(launch-bound), and less GPU time in a CUDA graph, where CPU time is not replayed
(docs/PERFORMANCE.md, 'Why the runtime chooses what it does'). So by default (the policy's
``fused="auto"``) the fused kernels are used for CUDA tensors inside :func:`capturing` (which
``ghlc.cuda_graph_step`` enters for its warm-up steps and the capture) when Triton is
available, and in eager steps only the Triton softmax, for large outputs. ``GHLC_FUSED`` in
the environment (read when the policy is made), or ``policy.override(fused=...)``, selects
``on`` (always, also on CPU for the compiled ones: needs a C++ compiler, slow to compile) or
``off`` (eager formulas only). Inside a
``torch.compile`` (a plastic call is a graph break under ``torch.compile`` of a prepared model,
so this only matters to code compiled some other way) the eager formulas are used. If a
kernel fails to build, ghlc warns once and falls back.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch

from ghlc.errors import first_line

from . import policy
from .status import STATUS


def check_mode() -> None:
    """Raise a one-line ConfigError for a bad ``GHLC_FUSED`` (checked when a model is built,
    not at the first step): the policy reads and checks it when it is made."""
    policy.current()


def mode() -> str:
    """The policy's ``fused`` mode: ``auto``, ``on`` or ``off``."""
    return policy.current().fused


@contextlib.contextmanager
def capturing(stack: bool = False) -> Iterator[None]:
    """Scope of the warm-up steps and the capture of a CUDA graph: ``auto`` uses the compiled
    kernels here (compiled during the warm-up, replayed without their CPU cost). ``stack``:
    plain convs also stack their two weight gradients into one call (``stacked_wgrads``)."""
    STATUS.capturing += 1
    STATUS.stacking += bool(stack)
    try:
        yield
    finally:
        STATUS.capturing -= 1
        STATUS.stacking -= bool(stack)


def stacking() -> bool:
    """Inside a ``capturing(stack=True)`` scope."""
    return STATUS.stacking > 0


@functools.cache
def _has_triton() -> bool:
    """Triton usable for CUDA here (asked once)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover
        return False
    return has_triton()


def active(t: torch.Tensor) -> bool:
    """Whether calls on ``t`` use the compiled kernels."""
    mode = policy.current().fused
    if STATUS.compile_broken is not None or mode == "off" or torch.compiler.is_compiling():
        return False
    if mode == "on":
        return True
    return STATUS.capturing > 0 and t.is_cuda and _has_triton()


# ------------------------------------------------------------------ the formulas (eager)
def softmax_eager(v: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    """softmax(t * v) over ``dim`` as reductions and in-place passes (t > 0)."""
    e = torch.sub(v, v.amax(dim, keepdim=True))
    if t != 1.0:
        e.mul_(t)
    e.exp_()
    return e.div_(e.sum(dim, keepdim=True))


def sign_combine_eager_(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``h <- |h| * sign(g) / (max|h| + 1e-30)`` in place (the layer-normalised GHL step)."""
    a = h.abs_()
    scale = a.amax() + 1e-30
    return a.mul_(torch.sign(g)).div_(scale)


def scaled_sign_eager_(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``a <- a * sign(g) / scale`` in place (one unit block of the in-call combine; ``g`` is
    overwritten)."""
    return a.mul_(g.sign_()).div_(scale)


def row_dots(c: torch.Tensor, w: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """``<c[k], w[k]>`` for every k along dim 0 (real tensors of one shape). On CPU,
    ``torch.linalg.vecdot`` over chunks of rows (a temporary of at most ``numel`` elements,
    default the policy's ``dot_block_numel``): one torch.bmm of (1 x n) by (n x 1) matrices
    ran slower there and rounds more (docs/PERFORMANCE.md, 'Why the runtime chooses what it
    does'). Elsewhere that bmm (one kernel, no temporary)."""
    numel = policy.current().dot_block_numel if numel is None else numel
    k = c.shape[0]
    if c.is_contiguous():
        c2, w2 = c.view(k, -1), w.reshape(k, -1)
    else:  # (a channels-last weight: its rows in memory order, as views, not copies)
        order = memory_order(c)
        c2, w2 = c.permute(order).reshape(k, -1), w.permute(order).reshape(k, -1)
    if c.device.type != "cpu":
        return torch.bmm(c2.unsqueeze(1), w2.unsqueeze(2)).view(k)
    rows = max(1, numel // max(1, c2.shape[1]))
    if rows >= k:
        return torch.linalg.vecdot(c2, w2)
    out = c2.new_empty(k)
    for s in range(0, k, rows):
        torch.linalg.vecdot(c2[s : s + rows], w2[s : s + rows], out=out[s : s + rows])
    return out


def memory_order(t: torch.Tensor) -> list[int]:
    """Dim 0, then ``t``'s other dims from the outermost in memory to the innermost: permuted
    so, a dense tensor whose dim-0 slices are dense (a channels-last weight) is contiguous,
    and its rows reshape as views. Ties keep the dims' order."""
    stride = t.stride()
    rest = sorted(range(1, t.dim()), key=lambda d: -stride[d])
    return [0, *rest]


def oja_decay_eager_(
    c: torch.Tensor, w: torch.Tensor, extra: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``c[k] <- c[k] - (<c[k], w[k]> + extra[k]) w[k]`` in place (or into ``out``), output
    units along dim 0 (Oja's decay; ``extra`` is the bias term, or None)."""
    s = row_dots(c, w)
    if extra is not None:
        s = s + extra
    s = s.view(-1, *([1] * (w.dim() - 1)))
    if out is None:
        return c.addcmul_(s, w, value=-1.0)
    return torch.addcmul(c, s, w, value=-1.0, out=out)


# ------------------------------------------------------------------ compiled twins
def _softmax(v: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    e = v - v.amax(dim, keepdim=True)
    if t != 1.0:
        e = e * t
    e = e.exp()
    return e / e.sum(dim, keepdim=True)


def _sign_combine_(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    a = h.abs()
    h.copy_(a * torch.sign(g) / (a.amax() + 1e-30))
    return h


def _scaled_sign_(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    a.copy_(a * torch.sign(g) / scale)
    return a


def _oja_decay_(
    c: torch.Tensor, w: torch.Tensor, extra: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    s = (c * w).flatten(1).sum(1)
    if extra is not None:
        s = s + extra
    dst = c if out is None else out
    dst.copy_(c - s.view(-1, *([1] * (w.dim() - 1))) * w)
    return dst


def _get(name: str, fn: Callable) -> Callable:
    compiled = STATUS.compiled
    if name not in compiled:
        compiled[name] = torch.compile(fn, dynamic=True)  # shapes vary by layer
    return compiled[name]


def _run(name: str, fn: Callable, eager: Callable, *args):
    try:
        return _get(name, fn)(*args)
    except Exception as e:  # a compiler/toolchain failure: fall back to the reference
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        STATUS.compile_broken = f"{type(e).__name__}: {first_line(e)}"
        warnings.warn(
            f"ghlc: compiling the fused Hebbian kernels failed "
            f"({STATUS.compile_broken}); "
            "using the eager formulas",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager(*args)


def _triton_softmax(v: torch.Tensor) -> Callable | None:
    """The hand-written Triton channel softmax, where it applies: CUDA tensors with Triton
    available, outside an outer torch.compile; in ``auto`` mode inside :func:`capturing`, or
    in an eager step for outputs of at least the policy's ``triton_eager_min_numel`` elements
    (docs/PERFORMANCE.md, 'Why the runtime chooses what it does')."""
    pol = policy.current()
    if pol.fused == "off" or STATUS.triton_broken is not None or not v.is_cuda:
        return None
    if pol.fused == "auto" and STATUS.capturing == 0 and v.numel() < pol.triton_eager_min_numel:
        return None
    if torch.compiler.is_compiling() or not _has_triton():
        return None
    try:
        from .triton_softmax import channel_softmax
    except Exception as e:  # pragma: no cover - a broken Triton install
        STATUS.triton_broken = f"{type(e).__name__}: {e}"
        return None
    return channel_softmax


def _triton_call(
    v: torch.Tensor, dim: int, t: float, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The Triton softmax where :func:`_triton_softmax` allows; None elsewhere or, once, when
    it fails to build (with a warning; the caller falls back)."""
    kernel = _triton_softmax(v)
    if kernel is None:
        return None
    try:
        return kernel(v, dim, t, out=out)
    except Exception as e:  # a Triton compile failure: fall back, once
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        STATUS.triton_broken = f"{type(e).__name__}: {first_line(e)}"
        warnings.warn(
            f"ghlc: the Triton softmax kernel failed ({STATUS.triton_broken}); using "
            "the compiled or eager formula",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def softmax(v: torch.Tensor, dim: int, t: float) -> torch.Tensor:
    """softmax(t * v) over ``dim`` (not the innermost dim: torch.softmax is best there): one
    Triton kernel (``triton_softmax.py``) where :func:`_triton_softmax` allows, else the
    compiled kernel where :func:`active`, else the eager formula."""
    y = _triton_call(v, dim, t)
    if y is not None:
        return y
    if active(v):
        return _run("softmax", _softmax, softmax_eager, v, dim, t)
    return softmax_eager(v, dim, t)


def softmax_into(v: torch.Tensor, dim: int, t: float, out: torch.Tensor) -> bool:
    """Write softmax(t * v) over ``dim`` into ``out`` (same shape, any strides) with the Triton
    kernel where :func:`_triton_softmax` allows; False (nothing written) elsewhere."""
    return dim % v.dim() != v.dim() - 1 and _triton_call(v, dim, t, out) is not None


def sign_combine_(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``h <- |h| * sign(g) / (max|h| + 1e-30)``, written into ``h``."""
    if active(h):
        return _run("sign_combine", _sign_combine_, sign_combine_eager_, h, g)
    return sign_combine_eager_(h, g)


def scaled_sign_(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``a <- a * sign(g) / scale``, written into ``a`` (``g`` may be overwritten)."""
    if active(a):
        return _run("scaled_sign", _scaled_sign_, scaled_sign_eager_, a, g, scale)
    return scaled_sign_eager_(a, g, scale)


def oja_decay_(
    c: torch.Tensor, w: torch.Tensor, extra: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``c[k] <- c[k] - (<c[k], w[k]> + extra[k]) w[k]``, written into ``c`` (or ``out``)."""
    if active(c):
        return _run("oja_decay", _oja_decay_, oja_decay_eager_, c, w, extra, out)
    return oja_decay_eager_(c, w, extra, out)
