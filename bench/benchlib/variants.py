"""The step variants as a table: what each one builds and which dispatch choices it changes.

A variant is a way of taking one SGD step of a model: plain backprop, the paper's naive GHL,
or ghlc with some ``GHLConfig`` settings and some ``DispatchPolicy`` fields overridden
(applied with ``ghlc.runtime.policy.override`` around each of its steps). Every ratio of a
variant is taken to its ``reference`` variant, timed in the same repeats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

SAMPLE_FRACTION = 0.25
AMP_DTYPE = torch.bfloat16  # the *_amp variants' autocast dtype


def _frozen(d: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Variant:
    """One row of a step table."""

    name: str
    description: str
    method: str = "ghlc"  # "bp" | "naive" | "ghlc"
    # GHLConfig settings besides the model's temperature.
    config: Mapping[str, Any] = field(default_factory=_frozen)
    # DispatchPolicy field -> value for the duration of each step.
    policy: Mapping[str, Any] = field(default_factory=_frozen)
    fused: str | None = None  # GHLC_FUSED mode for its steps ("on" | "off"); None: the process's
    compiled: bool = False  # the model under torch.compile
    amp: bool = False  # forward and loss under bfloat16 autocast
    graph: bool = False  # the whole step captured in one CUDA graph
    stack: bool = False  # captured with stack_weight_grads=True
    cuda_only: bool = False
    default: str = ""  # "cpu": in every device's default set; "cuda": in CUDA's only
    # Which kernel-floor probes give its Hebbian kernel time: "" (none, a backprop variant),
    # "full", "sampled" (the sampled block of the batch), "positions" (the sampled grid),
    # "amp_low" (the full kernels in bfloat16).
    kernels: str = "full"
    reference: str = "bp"

    @property
    def sampled(self) -> bool:
        return "sample_fraction" in self.config

    @property
    def floor_key(self) -> str:
        """The arithmetic floor it is measured against: "none", "floor" or "floor_sampled"."""
        return "none" if not self.kernels else "floor_sampled" if self.sampled else "floor"


S25 = {"sample_fraction": SAMPLE_FRACTION}
P25 = {"sample_fraction": SAMPLE_FRACTION, "sample_over": "positions"}
NO_FORWARD_FORM = {"forward_form_devices": ()}
WEIGHT_DOT = {"activity_sum_devices": ()}

_EAGER = (
    Variant("bp", "the model as is, plain backprop", method="bp", kernels="", default="cpu"),
    Variant(
        "naive",
        "GHL written the way the paper's demo does (benchlib/naive_ghl.py: forward "
        "hooks, F.unfold patches + matmul after backward)",
        method="naive",
        default="cpu",
    ),
    Variant("ghlc", "ghlc.prepare(model, ..., GHLConfig(temperature=...))", default="cpu"),
    Variant(
        "ghlc_s25",
        "ghlc with sample_fraction=0.25 (the fast approximate mode)",
        config=S25,
        kernels="sampled",
        default="cpu",
    ),
    Variant(
        "ghlc_p25",
        "ghlc_s25 over a grid of output positions of every sample "
        "(sample_over='positions') instead of a block of the batch",
        config=P25,
        kernels="positions",
    ),
    Variant(
        "ghlc_static",
        "ghlc with the static dispatch thresholds instead of the kernel "
        "choice measured at the first step",
        policy={"measure": False},
    ),
    Variant(
        "ghlc_s25_static",
        "ghlc_s25 with the static dispatch thresholds instead of the measured kernel choice",
        config=S25,
        policy={"measure": False},
        kernels="sampled",
    ),
    Variant(
        "ghlc_fused",
        "ghlc with GHLC_FUSED=on: the compiled kernels in every step, on CPU "
        "too (the first steps compile)",
        fused="on",
    ),
    Variant(
        "ghlc_wgrad",
        "ghlc with every Hebbian correlation as the weight-gradient call "
        "(the forward-conv form off)",
        policy=NO_FORWARD_FORM,
    ),
    Variant(
        "ghlc_s25_wgrad",
        "ghlc_s25 with the forward-conv form off",
        config=S25,
        policy=NO_FORWARD_FORM,
        kernels="sampled",
    ),
    Variant(
        "ghlc_wdot",
        "ghlc with Oja's per-unit sum always over the weight, never over y*u",
        policy=WEIGHT_DOT,
    ),
    Variant(
        "ghlc_s25_wdot",
        "ghlc_s25 with Oja's per-unit sum over the weight",
        config=S25,
        policy=WEIGHT_DOT,
        kernels="sampled",
    ),
    Variant(
        "ghlc_fast",
        "ghlc with hebbian_at='fast': no conv recomputes part of its H in "
        "backward (the split timing off)",
        config={"hebbian_at": "fast"},
    ),
    Variant(
        "ghlc_s25_fast",
        "ghlc_s25 with hebbian_at='fast'",
        config={**S25, "hebbian_at": "fast"},
        kernels="sampled",
    ),
    Variant(
        "ghlc_recompute",
        "ghlc with hebbian_at='recompute': the split timing on every device",
        config={"hebbian_at": "recompute"},
    ),
    Variant(
        "ghlc_nosoftmax",
        "ghlc without the channel softmax (competition='none'; a "
        "different rule, a diagnostic of the softmax's share)",
        config={"competition": "none"},
    ),
    Variant(
        "bp_compile",
        "bp under torch.compile (the first steps compile)",
        method="bp",
        compiled=True,
        kernels="",
        reference="bp_compile",
    ),
    Variant(
        "ghlc_compile",
        "ghlc under torch.compile: each plastic call a graph break",
        compiled=True,
        reference="bp_compile",
    ),
    Variant(
        "bp_amp",
        "bp with forward and loss under bfloat16 autocast",
        method="bp",
        amp=True,
        kernels="",
        reference="bp_amp",
    ),
    Variant(
        "ghlc_amp",
        "ghlc under bfloat16 autocast, H from operands upcast to float32",
        amp=True,
        reference="bp_amp",
    ),
    Variant(
        "ghlc_amp_low",
        "ghlc under bfloat16 autocast with hebbian_precision='autocast' "
        "(the correlation in bfloat16)",
        config={"hebbian_precision": "autocast"},
        amp=True,
        kernels="amp_low",
        reference="bp_amp",
    ),
    Variant(
        "ghlc_ref",
        "ghlc with its fused kernels off (GHLC_FUSED=off)",
        fused="off",
        cuda_only=True,
        default="cuda",
    ),
)


def _graph(v: Variant, default: str = "cuda", description: str = "", **changes: Any) -> Variant:
    """``v`` with the whole step captured in one CUDA graph (ratios to the captured bp)."""
    ref = v.reference if v.reference.endswith("_graph") else v.reference + "_graph"
    return dataclasses.replace(
        v,
        name=v.name + "_graph",
        graph=True,
        cuda_only=True,
        default=default,
        reference=ref,
        description=description or f"{v.name} captured in one CUDA graph",
        **changes,
    )


_BY_NAME = {v.name: v for v in _EAGER}
_CHUNK = dataclasses.replace(
    _BY_NAME["ghlc"], name="ghlc_chunk", policy={"in_call_combine_devices": ("cpu", "cuda")}
)
_STACK = dataclasses.replace(_BY_NAME["ghlc"], name="ghlc_stack", stack=True)
_STACK20 = dataclasses.replace(
    _BY_NAME["ghlc"], name="ghlc_stack20", stack=True, policy={"stack_max_numel": 1 << 20}
)
_GRAPHS = (
    _graph(_BY_NAME["bp"], kernels=""),
    _graph(_BY_NAME["ghlc"]),
    _graph(_BY_NAME["ghlc_ref"]),
    _graph(_CHUNK, description="ghlc_graph with the in-call combine that ghlc uses on CPU only"),
    _graph(
        _BY_NAME["ghlc_s25"],
        description="ghlc_s25 captured (the sampled block is drawn at "
        "capture and fixed across replays)",
    ),
    _graph(_BY_NAME["ghlc_p25"], description="ghlc_p25 captured (grid offsets drawn at capture)"),
    _graph(
        _STACK,
        description="ghlc_graph with stack_weight_grads=True (backprop's dL/dW and "
        "the correlation in one call)",
    ),
    _graph(_STACK20, description="ghlc_stack_graph stacking only weights under 2**20 elements"),
    _graph(_BY_NAME["bp_amp"], default=""),
    _graph(_BY_NAME["ghlc_amp"], default=""),
    _graph(_BY_NAME["ghlc_amp_low"], default=""),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in (*_EAGER, *_GRAPHS)}


def variant(name: str) -> Variant:
    """The variant of that name (a one-line error naming the known ones otherwise)."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})") from None


def defaults_for(device: str) -> tuple[str, ...]:
    """The variants a run on ``device`` takes without --variants."""
    wanted = ("cpu", "cuda") if device == "cuda" else ("cpu",)
    return tuple(v.name for v in VARIANTS.values() if v.default in wanted)


def reference(name: str) -> str:
    """The variant whose median step the ratios of ``name`` are taken to."""
    return variant(name).reference


def graph_variants() -> tuple[str, ...]:
    return tuple(v.name for v in VARIANTS.values() if v.graph)


def listing() -> str:
    """The table as text (``--list-variants``)."""
    w = max(map(len, VARIANTS))
    lines = []
    for v in VARIANTS.values():
        extra = [f"{k}={val!r}" for k, val in v.config.items()]
        extra += [f"policy {k}={val!r}" for k, val in v.policy.items()]
        where = (
            "default" if v.default == "cpu" else "default on CUDA" if v.default else "on request"
        ) + (", CUDA only" if v.cuda_only else "")
        lines.append(
            f"{v.name:<{w}}  {v.description} [{where}"
            + (f"; {', '.join(extra)}" if extra else "")
            + f"; ratios to {v.reference}]"
        )
    return "\n".join(lines)
