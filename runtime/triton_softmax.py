"""softmax(t * v) over a dim that is not the innermost one (the channels of NCHW), as one
Triton kernel: each program takes a block of positions and loops over the channels twice
(an online max and sum, then the normalised write), so the input is read twice and the output
written once, with no temporaries. Imported only where Triton is available."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _channel_softmax(
    v_ptr,
    y_ptr,
    C,
    S,
    n_sblocks,
    so,
    sc,
    ss,
    yo,
    yc,
    ys,
    t,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    o = pid // n_sblocks
    s = (pid % n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    cs = tl.arange(0, BLOCK_C)
    base = v_ptr + o.to(tl.int64) * so
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c[:, None] < C) & smask[None, :]
        x = (
            tl.load(
                base + c[:, None].to(tl.int64) * sc + s[None, :] * ss,
                mask=mask,
                other=float("-inf"),
            ).to(tl.float32)
            * t
        )
        m_new = tl.maximum(m, tl.max(x, axis=0))
        den = den * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    ybase = y_ptr + o.to(tl.int64) * yo
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        mask = (c[:, None] < C) & smask[None, :]
        x = (
            tl.load(
                base + c[:, None].to(tl.int64) * sc + s[None, :] * ss,
                mask=mask,
                other=float("-inf"),
            ).to(tl.float32)
            * t
        )
        y = tl.exp(x - m[None, :]) / den[None, :]
        tl.store(
            ybase + c[:, None].to(tl.int64) * yc + s[None, :] * ys,
            y.to(y_ptr.dtype.element_ty),
            mask=mask,
        )


def channel_softmax(
    v: torch.Tensor, dim: int, t: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(t * v) over ``dim`` (t > 0), same shape and memory layout as ``v``; or written
    into ``out`` (same shape; its dims after ``dim`` must merge into one, as in a channel
    slice of a contiguous tensor)."""
    dim = dim % v.dim()
    c = v.shape[dim]
    outer = 1
    for n in v.shape[:dim]:
        outer *= n
    s = 1
    for n in v.shape[dim + 1 :]:
        s *= n
    v3 = v.reshape(outer, c, s)  # a view for contiguous and channels-last tensors
    y3 = torch.empty_like(v3) if out is None else out.view(outer, c, s)
    if v3.numel() == 0:
        return y3.view(v.shape) if out is None else out
    block_s = min(triton.next_power_of_2(s), 64)
    block_c = max(1, min(triton.next_power_of_2(c), 4096 // block_s))
    n_sblocks = triton.cdiv(s, block_s)
    # Triton launches on the current device (the CPU interpreter in tests has none)
    with torch.cuda.device(v.device) if v.is_cuda else contextlib.nullcontext():
        _channel_softmax[(outer * n_sblocks,)](
            v3,
            y3,
            c,
            s,
            n_sblocks,
            *v3.stride(),
            *y3.stride(),
            float(t),
            BLOCK_C=block_c,
            BLOCK_S=block_s,
        )
    return y3.view(v.shape) if out is None else out
