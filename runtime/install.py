"""Attach a Runtime to a module: root hooks switch GHL on for training forwards.

Two ways to reach the plastic calls:

- a function mode (``GHLMode``) sees every torch call of the forward and routes the plastic
  ones: needed for functional uses, views and computed weights;
- where the trace found every plastic call to be its own stock ``nn.Conv{1,2,3}d`` /
  ``nn.Linear`` module's forward (most models), those modules' ``forward`` is replaced by a
  plastic one (:class:`PlasticForward`) and no mode is entered. The other torch calls of the
  forward then cost nothing extra (a Python function mode costs host time on every call:
  ``bench/overhead.py``, docs/PERFORMANCE.md).

Under ``torch.compile`` each plastic module call is a graph break (it runs eagerly), and a
model that needs the mode runs its whole training forward eagerly (:class:`EagerTraining`,
and ``force_eager`` for compiled submodules): a traced graph keeps neither the parameter
identities and views the mode goes by nor the Python state of the Hebbian hooks.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .calls import CallSpec, parse_call
from .clip import watch_rescaling
from .distributed import ddp_link
from .mode import _ATTR, GHLMode, Runtime, Site

_CONVS: dict[type[nn.Conv1d | nn.Conv2d | nn.Conv3d], Callable[..., torch.Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}


def _stock(module: nn.Module):
    """The torch class whose unmodified forward ``module`` runs, or None."""
    for cls in _CONVS:
        if (
            isinstance(module, cls)
            and type(module).forward is cls.forward
            and (type(module)._conv_forward is cls._conv_forward)
        ):
            return cls
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return nn.Linear
    return None


def owns_its_calls(module: nn.Module) -> bool:
    """Whether ``module`` is a Conv/Linear whose forward is torch's own (no override)."""
    return _stock(module) is not None


class PlasticForward:
    """Replaces the ``forward`` of a stock Conv/Linear module whose weight is plastic: the
    call is plastic during its runtime's training forwards, plain otherwise. (A callable
    object, not a bound method, so that copies and pickles of the module keep it.)"""

    def __init__(self, module: nn.Module, rt: Runtime, site: Site) -> None:
        self.module, self.rt, self.site = module, rt, site
        self.cls = _stock(module)
        self.spec: CallSpec | None = None

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        if self.rt.depth and torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # a graph break: see the module docstring
                return _eager(self._training, (input,), {})
            return self._training(input)
        return self.cls.forward(self.module, input)

    def _training(self, input: torch.Tensor) -> torch.Tensor:
        """A call in a training forward: plastic unless the weight was replaced or frozen."""
        m = self.module
        w = m.weight
        mine = w is self.site.param or (  # (under FSDP2: its unsharded form)
            self.rt.shards is not None
            and isinstance(w, torch.Tensor)
            and (self.rt.by_id.get(id(w)) or self.rt.unsharded(w)) is self.site
        )
        if not (mine and w.requires_grad):
            return self.cls.forward(m, input)
        padding: tuple[int, ...] | str | int | None
        if self.cls is nn.Linear:
            x, padding = input, None
        else:
            conv = cast(_ConvNd, m)  # (self.cls is one of _CONVS)
            x, padding = input, conv.padding
            if conv.padding_mode != "zeros":
                x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
                padding = 0
        if self.spec is None:  # fixed by the module's settings: parsed once
            self.spec = (
                CallSpec("linear")
                if padding is None
                else parse_call(
                    _CONVS[self.cls], (x, w, m.bias, m.stride, padding, m.dilation, m.groups), {}
                )[3]
            )
        spec = self.spec
        unbatched = spec.kind == "conv" and x.dim() == spec.nd + 1
        return Runtime.plastic(self.site, x, w, m.bias, spec, unbatched)


class EagerTraining:
    """``forward`` of a prepared module whose plastic calls need the function mode. Under
    ``torch.compile`` its training forwards run eagerly, as one graph break: the mode finds
    plastic calls by parameter identity and views (``in_proj_weight`` chunks), which a traced
    graph does not keep (MultiheadAttention's weights would silently get plain gradients).
    Eval and no-grad forwards, and every forward outside ``torch.compile``, are unchanged."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = module.__dict__.get("forward")  # an instance-level forward, if any

    def __call__(self, *args, **kwargs):
        fn, m = self._target(), self.module
        if torch.compiler.is_compiling() and m.training and torch.is_grad_enabled():
            return _eager(fn, args, kwargs)
        return fn(*args, **kwargs)

    def _target(self):
        """The model's own forward, bound."""
        return (
            self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)
        )

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own forward signature (libraries inspect ``model.forward``)."""
        return inspect.signature(self._target())


# torch.compiler.disable, except that torch's own variant imports dynamo (about 1.5 s) only
# once the function is called, which eager steps never do
_disable = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


@_disable
def _eager(fn, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)`` outside torch.compile's graphs (a graph break when traced)."""
    return fn(*args, **kwargs)


def _root_pre(module: torch.nn.Module, args) -> None:
    rt: Runtime = getattr(module, _ATTR)
    if module.training and torch.is_grad_enabled():
        rt.bind(module)
        link = ddp_link()  # under DistributedDataParallel? (distributed.py)
        for site in rt.sites.values():  # drop a term left by an interrupted backward
            site.state.pending = None
            if site.state.shards is None:
                site.state.ddp = link
        mode = stance = None
        if rt.module_calls:
            rt.depth += 1
        else:
            mode = GHLMode(rt)
            mode.__enter__()
            if "torch._dynamo" in sys.modules and not torch.compiler.is_compiling():
                # torch.compile'd submodules run eagerly too: a traced graph would not keep
                # the parameter identities and views the mode goes by (see EagerTraining)
                stance = torch.compiler.set_stance("force_eager")
        module.__dict__.setdefault("_ghl_modes", []).append((mode, stance))


def _root_post(module: torch.nn.Module, args, out) -> None:
    modes = module.__dict__.get("_ghl_modes")
    if modes:
        mode, stance = modes.pop()
        if mode is None:
            getattr(module, _ATTR).depth -= 1
        else:
            mode.__exit__(None, None, None)
        if stance is not None:
            stance.__exit__(None, None, None)


def _owner_pre(module: torch.nn.Module, args) -> None:
    for rt in _active_runtimes():
        site = rt.sites.get(module._ghl_computed_site)
        if site is not None:
            rt.computed_stack.append(site)


def _owner_post(module: torch.nn.Module, args, out) -> None:
    for rt in _active_runtimes():
        if rt.computed_stack and rt.computed_stack[-1].name == module._ghl_computed_site:
            rt.computed_stack.pop()


def _active_runtimes():
    from torch.overrides import _get_current_function_mode_stack

    return [m.rt for m in _get_current_function_mode_stack() if isinstance(m, GHLMode)]


def install(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Make ``module`` train with GHL (in place). Eval forwards are untouched."""
    object.__setattr__(module, _ATTR, runtime)
    watch_rescaling()  # warns when a plastic gradient was clipped (clip.py)
    module.register_forward_pre_hook(_root_pre)
    module.register_forward_hook(_root_post, always_call=True)
    if runtime.module_calls:
        for site in runtime.sites.values():
            owner = module.get_submodule(site.layer)
            owner.forward = PlasticForward(owner, runtime, site)
    elif runtime.sites:
        module.forward = EagerTraining(module)
    for name, site in runtime.sites.items():
        if site.weight_use == "computed":
            owner = module.get_submodule(name.rpartition(".")[0])
            # (nn.Module takes any attribute; its stub's __setattr__ types only tensors and
            # modules)
            owner._ghl_computed_site = name  # type: ignore[assignment]
            owner.register_forward_pre_hook(_owner_pre)
            owner.register_forward_hook(_owner_post, always_call=True)
    return module
