"""Runtime interception: a TorchFunctionMode that routes plastic conv/linear calls.

Plasticity is keyed by parameter identity: a call is plastic when its weight *is* a plastic
parameter, a view of one, or (inside the owning module's forward) a tensor computed from it
(weight standardisation). This sees functional uses (``F.linear(x, self.qkv.weight)``,
``nn.MultiheadAttention``'s ``in_proj_weight``) that module hooks never see. Models whose
plastic calls are all their own stock Conv/Linear modules' forwards skip the mode (see
``install.py``); ``GHLConfig(interception="mode")`` keeps it.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, cast

import torch
from torch.overrides import TorchFunctionMode

from ghlc.errors import RuntimeGHLError, describe
from ghlc.graph import HebbianRule, LayerGraph, LayerInfo

from .accumulate import PlasticParam
from .calls import MHA_FORWARD, parse_call, patched_linear
from .fsdp import Shards, groups_of, is_sharded
from .function import plastic_call


class Site:
    """One plastic parameter as the runtime sees it: its layer node's ``LayerInfo`` and its
    Hebbian node's rule from the graph, the global signal, and the runtime-only settings
    (``hebbian_at``: when H is computed; ``accumulation``; ``module_call``: reached by
    replacing its module's forward, see install.py)."""

    def __init__(
        self,
        info: LayerInfo,
        rule: HebbianRule,
        *,
        global_signal: str = "grad_sign",
        hebbian_at: str = "auto",
        accumulation: str = "auto",
        module_call: bool = False,
    ) -> None:
        self.info, self.rule = info, rule
        self.hebbian_at, self.module_call = hebbian_at, module_call
        self.state = PlasticParam(
            info.name, rule, info.module, accumulation, global_signal=global_signal
        )
        self.state.direct = info.weight_use == "direct"
        self.param: torch.Tensor | None = None

    @property
    def name(self) -> str:
        """The parameter's name, e.g. ``features.0.weight``."""
        return self.info.name

    @property
    def layer(self) -> str:
        """The layer: the owning module's path, e.g. ``features.0``."""
        return self.info.module

    @property
    def weight_use(self) -> str:
        return self.info.weight_use

    @property
    def copy_out(self) -> bool:
        return self.info.copy_out

    @property
    def out_saved(self) -> bool:
        return self.info.out_saved


class Runtime:
    """Holds the sites of one prepared module and binds them to its parameters."""

    def __init__(
        self,
        sites: list[Site],
        graph: LayerGraph | None = None,
        inputs: list[dict] | None = None,
        source: dict | None = None,
    ) -> None:
        self.sites = {s.name: s for s in sites}
        # what ghlc.save writes: the annotated graph (without the model), the example inputs'
        # shapes and dtypes, and the model's source file
        self.graph = graph
        self.inputs: list[dict] = inputs or []
        self.source: dict = source or {}
        self.by_id: dict[int, Site] = {}
        self.computed_stack: list[Site] = []
        self._bound_to: tuple[int, int] | None = None  # (module, its first plastic parameter)
        self.module: weakref.ref[torch.nn.Module] | None = None
        self.shards: Any = None  # under FSDP2 (fsdp.py): the sharded sites
        self._sharded: dict[int, torch.Tensor] = {}  # FSDP2: id(unsharded) -> sharded
        # every plastic call is its own module's stock forward: those forwards are replaced
        # and no function mode is needed (see install.py); ``depth`` counts training forwards
        self.module_calls = bool(sites) and all(s.module_call for s in sites)
        self.depth = 0

    def _key(self, module: torch.nn.Module) -> tuple[int, int]:
        """Identifies the parameters bound: ``fully_shard`` replaces them in place."""
        first = next(iter(self.sites), None)
        try:
            p = module.get_parameter(first) if first is not None else None
        except AttributeError:
            p = None
        return id(module), id(self._sharded.get(id(p), p))

    def bind(self, module: torch.nn.Module) -> None:
        key = self._key(module)
        if self._bound_to == key and self.by_id:
            return
        groups, self._sharded = groups_of(module)
        key = self._key(module)
        params = {
            _plain_name(n): self._sharded.get(id(p), p)
            for n, p in module.named_parameters(remove_duplicate=False)
        }
        self.by_id = {}
        for name, site in self.sites.items():
            p = params.get(name)
            if p is None:
                raise RuntimeGHLError(
                    f"plastic parameter {name!r} is no longer in the model (was a submodule "
                    "replaced after ghlc.prepare?); prepare the model as it will be trained"
                )
            self.by_id[id(p)] = site
            site.param = p
        self._bound_to = key
        self.module = weakref.ref(module)
        sharded = [s for s in self.sites.values() if s.param is not None and is_sharded(s.param)]
        self.shards = Shards([s.state for s in sharded], groups) if sharded else None

    def unsharded(self, w: torch.Tensor) -> Site | None:
        """Under FSDP2, the site whose parameter ``w`` is the unsharded form of: the tensor
        its module holds during its forward."""
        root = self.module() if self.module is not None else None
        if self.shards is None or root is None:
            return None
        for site in self.sites.values():
            if site.state.shards is not None:
                owner, _, attr = site.name.rpartition(".")
                if getattr(root.get_submodule(owner), attr, None) is w:
                    self.by_id[id(w)] = site  # (FSDP2 keeps the unsharded parameter)
                    return site
        return None

    def site_for(self, w: torch.Tensor):
        """(site, view geometry or None) for a weight tensor, or (None, None)."""
        s = self.by_id.get(id(w))
        if s is not None:
            return s, None
        if self.shards is not None and (s := self.unsharded(w)) is not None:
            return s, None
        base = w._base
        if base is not None:
            s = self.by_id.get(id(base)) or self.unsharded(base)
            if s is not None:
                return s, (w.size(), w.stride(), w.storage_offset() - base.storage_offset())
        if self.computed_stack:
            s = self.computed_stack[-1]
            assert s.param is not None  # the runtime was bound before this forward
            if s.param.shape == w.shape and not isinstance(w, torch.nn.Parameter):
                return s, None
        return None, None

    def handle(self, func, args, kwargs):
        parsed = parse_call(func, args, kwargs)
        if parsed is not None:
            x, w, b, spec, unbatched = parsed
            site, view = self.site_for(w)
            if site is not None and w.requires_grad and torch.is_grad_enabled():
                return self.plastic(site, x, w, b, spec, unbatched, view)
        return func(*args, **kwargs)

    @staticmethod
    def plastic(site: Site, x, w, b, spec, unbatched: bool, view=None) -> torch.Tensor:
        """Run one call of ``site`` as a plastic call; errors name the layer and user line.
        Always eager: under ``torch.compile`` the callers are graph breaks (install.py)."""
        assert site.param is not None  # bound (Runtime.bind) before any call reaches here
        site.state.arm(site.param)
        try:
            return plastic_call(
                x,
                w,
                b,
                spec,
                site.state,
                unbatched,
                site.copy_out,
                view,
                site.hebbian_at,
                site.out_saved,
            )
        except Exception as e:
            raise RuntimeGHLError(f"layer {site.layer!r} at {_user_line()}: {describe(e)}") from e


def _plain_name(name: str) -> str:
    """A parameter's name with the ``_orig_mod`` level of ``torch.compile``d submodules
    removed (their parameters are the prepared model's own)."""
    return name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")


def _user_line() -> str:
    """file:line of the innermost caller outside torch and ghlc (only computed on error)."""
    import os
    import traceback

    # the folders of torch, ghlc and its passes and runtime (which sit beside ghlc/ in a
    # source checkout), read from the loaded modules: the runtime does not import ghlc itself
    mods = [torch] + [sys.modules[n] for n in ("ghlc", "ghlc.passes") if n in sys.modules]
    # (cast: these are regular packages, loaded from files)
    dirs = {os.path.dirname(os.path.abspath(cast(str, m.__file__))) for m in mods}
    skip = tuple(d + os.sep for d in dirs | {os.path.dirname(os.path.abspath(__file__))})
    for fr in reversed(traceback.extract_stack()):
        if not os.path.abspath(fr.filename).startswith(skip):
            return f"{fr.filename}:{fr.lineno}"
    return "<unknown>"


class GHLMode(TorchFunctionMode):
    """Active during a prepared module's training forward."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.rt = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is MHA_FORWARD:
            with patched_linear(self.rt.handle):
                return func(*args, **kwargs)
        return self.rt.handle(func, args, kwargs)


_ATTR = "_ghl_runtime"  # the module attribute holding its Runtime (install.py attaches it)


def runtime_of(module: torch.nn.Module) -> Runtime | None:
    """The Runtime that ``install`` attached to ``module``, or None."""
    return getattr(module, _ATTR, None)


def is_prepared(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself has a Runtime attached (made by ghlc.prepare / ghlc.build)."""
    return runtime_of(module) is not None
