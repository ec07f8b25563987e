"""Attach a Runtime to a module: root hooks switch the GHL mode on for training forwards."""

from __future__ import annotations

import torch

from .mode import GHLMode, Runtime

ATTR = "_ghl_runtime"


def _root_pre(module: torch.nn.Module, args) -> None:
    rt: Runtime = getattr(module, ATTR)
    if module.training and torch.is_grad_enabled():
        rt.bind(module)
        for site in rt.sites.values():  # drop a term left by an interrupted backward
            site.state.pending = None
        mode = GHLMode(rt)
        mode.__enter__()
        module.__dict__.setdefault("_ghl_modes", []).append(mode)


def _root_post(module: torch.nn.Module, args, out) -> None:
    modes = module.__dict__.get("_ghl_modes")
    if modes:
        modes.pop().__exit__(None, None, None)


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
    object.__setattr__(module, ATTR, runtime)
    module.register_forward_pre_hook(_root_pre)
    module.register_forward_hook(_root_post, always_call=True)
    for name, site in runtime.sites.items():
        if site.weight_use == "computed":
            owner = module.get_submodule(name.rpartition(".")[0])
            owner._ghl_computed_site = name
            owner.register_forward_pre_hook(_owner_pre)
            owner.register_forward_hook(_owner_post, always_call=True)
    return module


def runtime_of(module: torch.nn.Module) -> Runtime | None:
    return getattr(module, ATTR, None)
