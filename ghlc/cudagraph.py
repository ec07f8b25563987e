"""Capture a whole GHL training step in a CUDA graph (static shapes, small models).

For small models a GHL step is many small kernels (the Hebbian softmax, reductions and the
sign combination add a few per plastic layer), so launch overhead dominates; replaying one
captured graph removes it. The captured step is the ordinary one: ghlc's hooks run at capture
time and the graph replays their kernels, so the numbers are those of the eager step (the
rule's elementwise steps run as compiled kernels here, see ``ghlc.runtime.fused``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from .errors import GHLError, first_line
from .runtime import fused


def cuda_graph_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    example_inputs: Sequence[torch.Tensor],
    example_target: torch.Tensor,
    warmup: int = 3,
    stack_weight_grads: bool = False,
    *,
    optimizer_step: bool = True,
    autocast: torch.dtype | None = None,
) -> Callable[..., torch.Tensor]:
    """Capture ``zero_grad; loss_fn(model(*inputs), target).backward(); optimizer.step()`` in a
    CUDA graph and return ``step(*inputs, target) -> loss`` that replays it.

    ``optimizer_step=False`` leaves the optimiser out of the graph: ``step`` replays the
    forward, loss and backward, leaves the gradients in ``.grad``, and the caller runs
    ``optimizer.step()`` eagerly (so learning-rate schedules and any optimiser work as usual).
    Each ``step`` re-points ``.grad`` at the graph's gradient buffers first, so eager steps in
    between (say, a smaller last batch) do not detach them. ``autocast`` (a dtype) runs the
    forward and loss under ``torch.autocast`` in it (without autocast's weight cache, which
    CUDA graphs do not allow).

    Inputs must keep the example's shapes and dtypes; they are copied into static buffers.
    ``warmup`` eager steps run on a side stream first (as CUDA graphs require); the model's and
    optimiser's state are restored afterwards, so capturing does not train. The learning rate
    is baked in at capture (a scheduler's later changes do not reach the graph unless the
    optimiser takes its lr as a tensor). The returned loss tensor is overwritten by each replay.
    With ``sample_fraction`` < 1 the block of the batch that the Hebbian term is estimated
    from is drawn at capture and is the same block in every replay (with shuffled batches it
    is still a random subset of the data); with ``sample_over="positions"`` the grid's
    offsets are likewise fixed at capture (the same positions of every image in every step,
    so prefer the batch block, or random crops, for long captured runs).

    ``stack_weight_grads=True`` trades memory for time: each plain conv (not grouped or
    transposed, whole batch, Hebbian term computed in the backward pass) computes backprop's
    weight gradient and the Hebbian correlation in one weight-gradient call with the two
    cotangents stacked along the output channels. Same numbers up to float rounding; a faster
    step for a higher peak (the measured trade: docs/PERFORMANCE.md, "CUDA").
    """
    if not torch.cuda.is_available():
        raise GHLError("cuda_graph_step needs a CUDA device")
    inputs = tuple(example_inputs)
    tensors = [*inputs, example_target, *model.parameters()]
    if any(not t.is_cuda for t in tensors):
        raise GHLError("cuda_graph_step: the model, inputs and target must all be on CUDA")
    if optimizer_step and optimizer.defaults.get("capturable") is False:
        raise GHLError(
            f"{type(optimizer).__name__} must be built with capturable=True to be "
            "captured in a CUDA graph"
        )
    static_in = [t.detach().clone() for t in inputs]
    static_target = example_target.detach().clone()

    def forward() -> torch.Tensor:
        with torch.autocast(
            "cuda",
            dtype=autocast or torch.bfloat16,
            enabled=autocast is not None,
            cache_enabled=False,
        ):
            return loss_fn(model(*static_in), static_target)

    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), fused.capturing(stack_weight_grads):
        for _ in range(max(1, warmup)):
            optimizer.zero_grad(set_to_none=True)
            forward().backward()
            optimizer.step()  # (also without optimizer_step: ghlc's state after a step)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with torch.no_grad():
        model.load_state_dict(model_state)
    optimizer.load_state_dict(opt_state)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    try:
        with torch.cuda.graph(graph), fused.capturing(stack_weight_grads):
            static_loss = forward()
            static_loss.backward()
            if optimizer_step:
                optimizer.step()
    except Exception as e:
        msg = first_line(e) or type(e).__name__
        raise GHLError(f"this training step cannot be captured in a CUDA graph: {msg}") from e
    grads = (
        [] if optimizer_step else [(p, p.grad) for p in model.parameters() if p.grad is not None]
    )

    def step(*new_inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(new_inputs) != len(static_in):
            raise GHLError(f"expected {len(static_in)} input(s), got {len(new_inputs)}")
        for buf, t in zip(static_in, new_inputs):
            if t.shape != buf.shape:
                raise GHLError(
                    f"input shape {tuple(t.shape)} differs from the captured {tuple(buf.shape)}"
                )
            buf.copy_(t)
        static_target.copy_(target)
        for p, g in grads:
            p.grad = g
        graph.replay()
        return static_loss

    step.graph = graph  # type: ignore[attr-defined]
    return step
