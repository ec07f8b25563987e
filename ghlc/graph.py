"""LayerGraph, the IR: a networkx graph of a model's layers, their roles, Hebbian nodes and edges.

Pure data: it imports nothing from the runtime. Node types: ``io`` (input/output), ``layer``
(one weight parameter used by conv/linear calls, keyed by the parameter's name; its
``LayerInfo.module`` is the layer, the owning module's path), ``hebbian`` (one per plastic
parameter, holds its HebbianRule), ``global_sign`` (the single source of the backprop sign and
the only place the global signal is stored, with a ``broadcast`` edge to every Hebbian node).
Layer-to-layer ``data`` edges follow the data flow between layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import networkx as nx
import torch

from .config import GHLConfig

INPUT, OUTPUT, GLOBAL_SIGN = "input", "output", "global_sign"


@dataclass(frozen=True)
class HebbianRule:
    """Per-layer rule settings, attached to a Hebbian node of the layer graph (the
    variants of the rule in the shared design; the paper's choice is each default). The
    global signal is not here: it lives on the global-sign node (``LayerGraph.global_signal``)."""

    temperature: float = 1.0
    competition: str = "softmax"
    competition_scope: str = "layer"
    local_rule: str = "oja"
    sample_fraction: float = 1.0
    normalisation: str = "layer"
    sample_over: str = "batch"
    precision: str = "full"


class Role(StrEnum):
    PLASTIC = "plastic"
    BACKPROP = "backprop"
    FROZEN = "frozen"


@dataclass(frozen=True)
class LayerInfo:
    """Typed metadata of one layer node (one weight parameter)."""

    name: str  # parameter name, e.g. "features.0.weight"
    module: str  # owning module path
    module_type: str
    kind: str  # conv1d|conv2d|conv3d|conv_transpose{1,2,3}d|linear
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int = 1
    calls: int = 1
    weight_use: str = "direct"  # direct | view | computed
    copy_out: bool = False  # output modified in place later: keep a private copy
    out_saved: bool = False  # backprop keeps the output alive anyway (saving it is free)
    module_call: bool = False  # every call is its own stock Conv/Linear module's forward
    is_output: bool = False
    requires_grad: bool = True
    order: int = 0
    role: Role = Role.BACKPROP
    reason: str = ""

    @property
    def family(self) -> str:
        return "linear" if self.kind == "linear" else "conv"


def hebb_key(param: str) -> str:
    """The Hebbian node of the plastic parameter named ``param``."""
    return f"hebbian:{param}"


@dataclass(frozen=True)
class LayerGraph:
    """The model's layers as a graph, plus what produced it. Passes return new instances."""

    g: nx.DiGraph
    model: torch.nn.Module | None = field(default=None, compare=False, repr=False)
    example_inputs: tuple = field(default=(), compare=False, repr=False)
    example_kwargs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    config: GHLConfig = field(default_factory=GHLConfig)
    capture: str = "eager"
    capture_errors: tuple[tuple[str, str], ...] = ()
    program: Any = field(default=None, compare=False, repr=False)

    # ---- construction helpers -------------------------------------------------------
    def evolve(self, **changes: Any) -> LayerGraph:
        return dataclasses.replace(self, **changes)

    def with_config(self, config: GHLConfig) -> LayerGraph:
        return self.evolve(config=config)

    def copy_graph(self) -> nx.DiGraph:
        return self.g.copy()

    # ---- queries --------------------------------------------------------------------
    def layers(self) -> list[LayerInfo]:
        infos = [d["info"] for _, d in self.g.nodes(data=True) if d["type"] == "layer"]
        return sorted(infos, key=lambda i: i.order)

    def layer(self, name: str) -> LayerInfo:
        """The layer node of the weight parameter named ``name``."""
        return self.g.nodes[name]["info"]

    def plastic(self) -> list[LayerInfo]:
        return [i for i in self.layers() if i.role is Role.PLASTIC]

    def hebbian_nodes(self) -> list[str]:
        return sorted(n for n, d in self.g.nodes(data=True) if d["type"] == "hebbian")

    def rule(self, param: str) -> HebbianRule:
        """The Hebbian rule of the plastic parameter named ``param``."""
        return self.g.nodes[hebb_key(param)]["rule"]

    @property
    def global_signal(self) -> str | None:
        """The global-sign node's signal ("grad_sign" | "none"), None before
        broadcast_global_sign has run."""
        return self.g.nodes[GLOBAL_SIGN]["signal"] if GLOBAL_SIGN in self.g else None

    # ---- stable text / dot forms ----------------------------------------------------
    def to_text(self) -> str:
        """A stable, line-oriented form (used for golden files)."""
        lines = [f"capture {self.capture}"]
        for i in self.layers():
            lines.append(
                f"layer {i.name} {i.kind} module={i.module}({i.module_type}) "
                f"w={_shape(i.weight_shape)} in={_shape(i.in_shape)} out={_shape(i.out_shape)} "
                f"groups={i.groups} calls={i.calls} use={i.weight_use} role={i.role.value}"
                + (" output" if i.is_output else "")
                + (f" reason={i.reason!r}" if i.reason else "")
            )
            hk = hebb_key(i.name)
            if hk in self.g:
                r = self.g.nodes[hk]["rule"]
                lines.append(
                    f"  hebbian T={r.temperature:g} competition={r.competition}/"
                    f"{r.competition_scope} rule={r.local_rule}"
                    + (f" sample={r.sample_fraction:g}" if r.sample_fraction < 1 else "")
                    + ("/positions" if r.sample_fraction < 1 and r.sample_over != "batch" else "")
                    + (f" norm={r.normalisation}" if r.normalisation != "layer" else "")
                    + (f" precision={r.precision}" if r.precision != "full" else "")
                )
        order = {i.name: i.order for i in self.layers()}
        order[INPUT], order[OUTPUT] = -1, 10**9
        data = sorted(
            ((u, v) for u, v, d in self.g.edges(data=True) if d["type"] == "data"),
            key=lambda e: (order.get(e[0], 0), order.get(e[1], 0), e),
        )
        lines += [f"edge {u} -> {v}" for u, v in data]
        n_b = sum(1 for *_, d in self.g.edges(data=True) if d["type"] == "broadcast")
        if GLOBAL_SIGN in self.g:
            lines.append(f"global_sign {self.g.nodes[GLOBAL_SIGN]['signal']} -> {n_b} hebbian")
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        out = ["digraph ghlc {", "  rankdir=TB; node [fontname=Helvetica];"]
        for n, d in self.g.nodes(data=True):
            if d["type"] == "layer":
                i = d["info"]
                color = "lightgoldenrod" if i.role is Role.PLASTIC else "lightgrey"
                label = f"{i.module}\\n{i.kind} {_shape(i.weight_shape)}\\n{i.role.value}"
                out.append(f'  "{n}" [shape=box style=filled fillcolor={color} label="{label}"];')
            elif d["type"] == "hebbian":
                r = d["rule"]
                out.append(
                    f'  "{n}" [shape=ellipse color=darkgreen label="Hebbian T={r.temperature:g}"];'
                )
            elif d["type"] == "global_sign":
                out.append(f'  "{n}" [shape=diamond color=red label="sign(dL/dW)"];')
            else:
                out.append(f'  "{n}" [shape=plaintext];')
        for u, v, d in self.g.edges(data=True):
            style = {"data": "solid", "update": "dotted", "broadcast": "dashed"}[d["type"]]
            out.append(f'  "{u}" -> "{v}" [style={style}];')
        out.append("}")
        return "\n".join(out) + "\n"


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ",".join(str(int(v)) for v in s) + ")"
