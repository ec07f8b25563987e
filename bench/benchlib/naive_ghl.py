"""GHL written the way the paper's demo code does it: the benchmark's naive baseline.

Forward hooks keep each convolution's input ``x`` and output ``u``. After ``loss.backward()``
``apply()`` computes, per convolution, the Hebbian term from explicitly unfolded patches:

    y = softmax(t * u)                      over output channels, at every position
    P = F.unfold(x)                         (N, C_in*k*k, L) patches, materialised
    H = y @ P^T - (sum y*u)[k] * W[k]       one matmul over all N*L positions
    H = H / (max|H| + 1e-30)
    W.grad = |H| * sign(W.grad)

Only ``nn.Conv2d`` with zero padding is supported (all the benchmark's models); a grouped or
depthwise conv takes one matmul per group (batched). This is deliberately the straightforward
implementation, not an optimised one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class NaiveGHL:
    """Attach to ``model``; call ``apply()`` between ``loss.backward()`` and ``opt.step()``."""

    def __init__(self, model: nn.Module, temperature: float | Mapping[str, float] = 1.0):
        self.convs: list[tuple[str, nn.Conv2d, float]] = []
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Conv2d):
                continue
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise ValueError(f"naive GHL: unsupported conv {name!r}")
            t = temperature.get(name, 1.0) if isinstance(temperature, Mapping) else temperature
            self.convs.append((name, mod, float(t)))
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            if mod.training:
                self.cache[name] = (inputs[0].detach(), output.detach())

        return hook

    @torch.no_grad()
    def apply(self) -> None:
        for name, mod, t in self.convs:
            if name not in self.cache or mod.weight.grad is None:
                continue
            x, u = self.cache.pop(name)
            w = mod.weight
            c_out, g = w.shape[0], mod.groups
            y = torch.softmax(t * u, dim=1)
            patches = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            ckk = patches.shape[1]
            p2 = patches.permute(1, 0, 2).reshape(g, ckk // g, -1)  # (g, C_in/g*k*k, N*L)
            y2 = y.permute(1, 0, 2, 3).reshape(g, c_out // g, -1)  # (g, C_out/g, N*L)
            corr = torch.bmm(y2, p2.transpose(1, 2)).view_as(w)
            decay = (y * u).sum(dim=(0, 2, 3)).view(-1, 1, 1, 1) * w
            h = corr - decay
            h = h / (h.abs().max() + 1e-30)
            w.grad = h.abs() * torch.sign(w.grad)
        self.cache.clear()
