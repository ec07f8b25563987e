"""record: the eager run that sees every conv/linear call, its weight's identity, shapes and
the data flow between layers (one of trace's two parts; capture.py is the other).

Every capture tier shares it: plasticity is keyed by the parameter objects a call actually
uses, so functional uses and computed weights are found whatever program capture produced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import TraceError, describe
from .runtime.calls import MHA_FORWARD, parse_call, patched_linear


@dataclass
class CallRecord:
    param: str
    weight_use: str
    kind: str
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    module_stack: tuple[str, ...]
    out_ptr: int = 0  # storage address of the output (to test whether backprop keeps it)


@dataclass
class Recording:
    calls: list[CallRecord] = field(default_factory=list)
    edges: set[tuple[str, str]] = field(default_factory=set)
    mutated: set[str] = field(default_factory=set)  # params whose call output was changed in place
    # conv/linear calls whose weight is no parameter: (module, why, weight requires grad)
    skipped: list[tuple[str, str, bool]] = field(default_factory=list)
    saved_ptrs: set[int] | None = None  # storages autograd saved for backward (None: unknown)

    def out_saved(self, param: str) -> bool:
        """True when backprop itself keeps every output of ``param``'s calls alive."""
        if self.saved_ptrs is None:
            return False
        outs = [c.out_ptr for c in self.calls if c.param == param]
        return bool(outs) and all(p in self.saved_ptrs for p in outs)

    def output_layers(self) -> set[str]:
        """The layers whose outputs reach the model's output and no other conv/linear layer:
        the classifier, each head of a multi-head model, the last projection of a headless
        backbone. A layer whose output also flows on (along a residual stream, say) into
        another layer is not one, even where the stream reaches the output through additions
        only; a layer feeding only itself (a weight shared across steps) can be one."""
        feeds = {u for u, v in self.edges if v != "output" and v != u}
        return {u for u, v in self.edges if v == "output" and u not in feeds}


def _is_inplace(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return (
        kwargs.get("inplace") is True
        or (name.endswith("_") and not name.endswith("__"))
        or (name.startswith("__i") and name.endswith("__"))
    )


class _RecordMode(TorchFunctionMode):
    def __init__(
        self,
        params: dict[int, str],
        owners: dict[str, tuple[str, tuple[int, ...]]],
        rec: Recording,
        stack: list[str],
    ) -> None:
        super().__init__()
        self.params, self.owners, self.rec, self.stack = params, owners, rec, stack
        self.prov: dict[int, frozenset] = {}
        self.keep: list[torch.Tensor] = []  # keep tensors alive so ids stay unique
        self.out_owner: dict[int, str] = {}

    def set_prov(self, t, p: frozenset) -> None:
        if isinstance(t, torch.Tensor):
            self.prov[id(t)] = p
            self.keep.append(t)

    def prov_of(self, tree) -> frozenset:
        out: frozenset = frozenset()
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                out = out | self.prov.get(id(leaf), frozenset())
        return out

    def resolve(self, w: torch.Tensor):
        name = self.params.get(id(w))
        if name is not None:
            return name, "direct"
        if w._base is not None and id(w._base) in self.params:
            return self.params[id(w._base)], "view"
        if isinstance(w, torch.nn.Parameter):
            return None, None
        for mod in reversed(self.stack):  # computed from the running module's own weight
            cand = self.owners.get(mod)
            if cand is not None and cand[1] == tuple(w.shape):
                return cand[0], "computed"
            break
        return None, None

    def owner_of(self, t: torch.Tensor) -> str | None:
        """The parameter whose call output ``t`` is, or is a view of (a slice changed in place
        changes the output too)."""
        name = self.out_owner.get(id(t))
        if name is None and t._is_view():
            name = self.out_owner.get(id(t._base))
        return name

    def handle(self, func, args, kwargs):
        parsed = parse_call(func, args, kwargs)
        src = self.prov_of((args, kwargs))
        if _is_inplace(func, kwargs):
            for leaf in tree_flatten((args[:1], kwargs.get("out")))[0]:
                owner = self.owner_of(leaf) if isinstance(leaf, torch.Tensor) else None
                if owner is not None:
                    self.rec.mutated.add(owner)
        out = func(*args, **kwargs)
        if parsed is not None:
            x, w, b, spec, _ = parsed
            name, use = self.resolve(w)
            if name is not None:
                self.rec.calls.append(
                    CallRecord(
                        name,
                        use,
                        spec.name,
                        spec.groups,
                        tuple(x.shape),
                        tuple(out.shape),
                        tuple(self.stack),
                        _storage_ptr(out),
                    )
                )
                for s in src:
                    self.rec.edges.add((s, name))
                self.set_prov(out, frozenset([name]))
                self.out_owner[id(out)] = name
                if out._is_view():  # (F.linear on 3+ dims returns a view of its result)
                    self.out_owner[id(out._base)] = name
                return out
            where = self.stack[-1] if self.stack else "<root>"
            self.rec.skipped.append(
                (where, f"{spec.name} weight is not a parameter", bool(w.requires_grad))
            )
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                old = self.prov.get(id(leaf), frozenset())
                self.set_prov(leaf, old | src)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is MHA_FORWARD:
            with patched_linear(self.handle):
                return self.handle(func, args, kwargs)
        return self.handle(func, args, kwargs)


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return 0


@contextlib.contextmanager
def _saved_storages(ptrs: set[int]):
    """Note the storage of every tensor autograd saves for backward (the record run keeps all
    tensors alive, so addresses are not reused)."""

    def pack(t):
        ptrs.add(_storage_ptr(t))
        return None  # the record run never runs backward; holding t would leak a cycle

    def unpack(_):
        raise TraceError("internal: the record run's graph cannot be differentiated")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextlib.contextmanager
def _preserved_state(model: torch.nn.Module):
    """Run without side effects on the model: buffers (BN statistics) and mode are restored.
    The caller (``trace``) restores the random state."""
    bufs = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not isinstance(v, torch.nn.Parameter)
    }
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            sd = model.state_dict()
            for k, v in bufs.items():
                if k in sd:
                    sd[k].copy_(v)
        model.train(was_training)


def record(
    model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any] | None = None
) -> Recording:
    """Run ``model`` once in training mode on ``example_inputs`` (and keyword inputs
    ``example_kwargs``) and record its layer calls.

    The run also notes which layer outputs autograd saves for backward (``out_saved``). A model
    that differentiates inside its forward (``torch.autograd.grad``) cannot run under that
    watch; it is then recorded without it (outputs counted as not saved). When the
    training-mode run fails but an eval-mode run works (BatchNorm on a batch of one), the
    eval-mode run is used."""
    first: TraceError | None = None
    for train, watch in ((True, True), (True, False), (False, False)):
        try:
            return _record(
                model, example_inputs, example_kwargs or {}, train=train, watch_saved=watch
            )
        except TraceError as e:
            first = first or e
    assert first is not None  # every try failed
    raise first


def _record(
    model: torch.nn.Module,
    example_inputs: tuple,
    example_kwargs: dict[str, Any],
    train: bool,
    watch_saved: bool = True,
) -> Recording:
    params: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), n)  # a shared weight is named after its first alias
    mod_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owners: dict[str, tuple[str, tuple[int, ...]]] = {}
    for mname, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if isinstance(w, torch.nn.Parameter):
            owners[mname] = ((mname + "." if mname else "") + "weight", tuple(w.shape))
    rec = Recording()
    stack: list[str] = []

    def pre(mod, args):
        stack.append(mod_names.get(id(mod), "?"))

    def post(mod, args, out):
        if stack:
            stack.pop()

    mode = _RecordMode(params, owners, rec, stack)
    rec.saved_ptrs = set() if watch_saved else None
    h1 = register_module_forward_pre_hook(pre)
    h2 = register_module_forward_hook(post)  # not on error: the stack then names the culprit
    try:
        with _preserved_state(model):
            model.train(train)
            with torch.enable_grad():
                for x in tree_flatten((example_inputs, example_kwargs))[0]:
                    mode.set_prov(x, frozenset(["input"]))
                watch = (
                    _saved_storages(rec.saved_ptrs)
                    if rec.saved_ptrs is not None
                    else contextlib.nullcontext()
                )
                with mode, watch:
                    out = model(*example_inputs, **example_kwargs)
                for s in mode.prov_of(out):
                    rec.edges.add((s, "output"))
    except TraceError:
        raise
    except Exception as e:  # the model itself fails on these inputs
        where = f" in module {stack[-1]!r}" if stack and stack[-1] else ""
        raise TraceError(f"the model fails on the example inputs{where}: {describe(e)}") from e
    finally:
        h1.remove()
        h2.remove()
    return rec
