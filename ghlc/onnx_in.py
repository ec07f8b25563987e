"""ONNX in: an ONNX file becomes a trainable torch module (through onnx2torch), then goes
through the normal pipeline (trace, passes, artifact).

onnx2torch (the ``onnx-in`` extra; docs/ONNX_IN.md says why this converter) builds an fx
``GraphModule``. Conv, ConvTranspose and Gemm with constant weights become ``nn.Conv*d`` /
``nn.Linear`` with Parameters; everything else that reads a constant tensor keeps it as a
buffer, which would never train. So after converting, ghlc:

- turns ``MatMul(x, W)`` with a constant 2-D ``W`` into ``F.linear(x, W')`` with a Parameter
  ``W' = W.T`` (a "linear" layer to ghlc, plastic when the config includes linear layers);
- makes Parameters of the other constant floating-point inputs of Gemm, MatMul, Conv,
  ConvTranspose and of the scale and bias of normalisations, and of the bias of an ``Add``
  right after a MatMul (running statistics and other constants stay buffers);
- checks the module against onnxruntime on the example input.

A BatchNorm folded into the preceding conv by the exporter (torch's constant folding in eval
mode does that) leaves no trace in the file, so ghlc cannot know it was there. It warns when
the graph has convolutions and no normalisation operator at all: the one case where folding
may have happened (see docs/ONNX_IN.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import GHLError, describe, first_line

__all__ = [
    "FoldedNormWarning",
    "LoadedOnnx",
    "OnnxInError",
    "converter_available",
    "is_onnx_path",
    "load_onnx",
    "onnx_record",
    "onnx_source",
]

# ONNX operators whose constant floating-point inputs are trainable weights.
WEIGHT_OPS = ("OnnxMatMul", "OnnxGemm")
NORM_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization",
            "GroupNormalization", "LpNormalization", "LRN")  # fmt: skip
CONV_OPS = ("Conv", "ConvTranspose")
# onnx2torch 1.5 has converters up to opset 17 for most operators (Identity, Reshape, Pad,
# Split, ReduceMean... changed version after it): newer files go through onnx's own version
# converter to this opset first.
CONVERTER_OPSET = 17


class OnnxInError(GHLError):
    """An ONNX file that is not ONNX, or that onnx2torch cannot convert."""


class FoldedNormWarning(UserWarning):
    """The ONNX graph has convolutions but no normalisation: one may have been folded away."""


@dataclass
class LoadedOnnx:
    """A converted ONNX model: the module, an example input and where it came from."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    path: Path
    sha256: str
    opset: int
    promoted: list[str] = field(default_factory=list)  # buffers made Parameters


def is_onnx_path(path: str | Path) -> bool:
    """Whether ``path`` names an ONNX file (by its suffix)."""
    return Path(path).suffix.lower() == ".onnx"


class MatMulLinear(nn.Module):
    """``x @ W`` with a trainable ``W``, written as ``F.linear(x, weight)``, ``weight = W.T``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.detach().t().contiguous().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _MissingTorchvision(types.ModuleType):
    """Stands in for torchvision while onnx2torch is imported: only its NMS and RoiAlign
    converters use torchvision, and those raise when called."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise OnnxInError(f"this model's {name} needs torchvision, which is not installed")

        return missing


@contextlib.contextmanager
def _torchvision_or_placeholder() -> Iterator[None]:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        names = ("torchvision", "torchvision.ops", "torchvision.io")
        stubs = {n: _MissingTorchvision(n) for n in names}
        stubs["torchvision"].ops = stubs["torchvision.ops"]  # type: ignore[attr-defined]
        stubs["torchvision"].io = stubs["torchvision.io"]  # type: ignore[attr-defined]
        sys.modules.update(stubs)
        try:
            yield
        finally:
            for n in names:
                if sys.modules.get(n) is stubs[n]:
                    del sys.modules[n]
        return
    yield


def _onnx2torch() -> Any:
    try:
        with _torchvision_or_placeholder():
            import onnx2torch
            from onnx2torch.node_converters.registry import get_converter
    except ImportError as e:
        raise OnnxInError(
            f"converting ONNX needs onnx2torch ({first_line(e)}): pip install 'ghlc[onnx-in]'"
        ) from None
    return onnx2torch, get_converter


def converter_available() -> bool:
    """Whether the ONNX converter (the ``onnx-in`` extra) can be imported."""
    try:
        _onnx2torch()
    except OnnxInError:
        return False
    return True


def _read(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise OnnxInError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:
        raise OnnxInError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not proto.opset_import or not proto.graph.node:
        raise OnnxInError(f"{path}: not an ONNX model (no graph or no opset)")
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise OnnxInError(f"{path}: not a valid ONNX model: {first_line(e)}") from None
    return proto


def _opsets(proto: Any) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}


def _downgrade(proto: Any) -> Any:
    """``proto`` at :data:`CONVERTER_OPSET` when it is newer and onnx can convert it, else as is."""
    from onnx import version_converter

    if _opsets(proto).get("ai.onnx", 0) <= CONVERTER_OPSET:
        return proto
    try:
        return version_converter.convert_version(proto, CONVERTER_OPSET)
    except Exception:  # (the operator check then names what cannot be converted)
        return proto


def _check_operators(path: Path, proto: Any, get_converter: Any, file_opset: int) -> None:
    """A one-line error naming the first operator onnx2torch has no converter for."""
    opsets = _opsets(proto)
    for node in proto.graph.node:
        domain = node.domain or "ai.onnx"
        version = opsets.get(domain)
        if version is None:
            raise OnnxInError(f"{path}: operator {node.op_type} uses undeclared domain {domain}")
        try:
            get_converter(operation_type=node.op_type, version=version, domain=node.domain or "")
        except NotImplementedError:
            where = f"opset {file_opset}" if domain == "ai.onnx" else f"{domain} opset {version}"
            raise OnnxInError(
                f"{path}: operator {node.op_type} ({where}) is not supported "
                "by the ONNX converter (onnx2torch)"
            ) from None


def _input_shape(path: Path, value: Any) -> tuple[int, ...]:
    dims = []
    for i, d in enumerate(value.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif i == 0:
            dims.append(2)  # a symbolic batch: 2, so that BatchNorm can train on it
        else:
            raise OnnxInError(
                f"{path}: input {value.name!r} has a symbolic dimension {i}; give the shape "
                "with --input-shape"
            )
    return tuple(dims)


def _example_inputs(
    path: Path, proto: Any, shape: Sequence[int] | None
) -> tuple[torch.Tensor, ...]:
    import onnx

    inits = {i.name for i in proto.graph.initializer}
    values = [v for v in proto.graph.input if v.name not in inits]
    if shape is not None and len(values) != 1:
        raise OnnxInError(f"{path}: --input-shape gives one input; the model has {len(values)}")
    out = []
    for v in values:
        dt = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        dims = tuple(shape) if shape is not None else _input_shape(path, v)
        t = torch.from_numpy(np.zeros(dims, dtype=dt))
        out.append(torch.randn(dims).to(t.dtype) if t.is_floating_point() else t)
    return tuple(out)


def _promote(gm: torch.fx.GraphModule) -> list[str]:
    """Make the trainable constants of the converted graph Parameters (see the module doc)."""
    try:
        inits = gm.get_submodule("initializers")
    except AttributeError:  # every constant went into a module (no initializer left)
        inits = nn.Module()
    promoted: list[str] = []

    def const(node: Any) -> torch.Tensor | None:
        if getattr(node, "op", None) != "get_attr" or not node.target.startswith("initializers."):
            return None
        t = getattr(inits, node.target.split(".", 1)[1])
        return t if t.is_floating_point() else None

    def make_param(node: Any) -> None:
        name = node.target.split(".", 1)[1]
        if name in inits._buffers:
            t = inits._buffers.pop(name)
            assert t is not None
            inits.register_parameter(name, nn.Parameter(t.detach().clone()))
            promoted.append(node.target)

    for node in list(gm.graph.nodes):  # Identity(constant) -> the constant itself, so that
        # BatchNorm's running statistics update the buffers, not a copy of them
        if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ in (
            "OnnxCopyIdentity",
            "Identity",
        ):
            if len(node.args) == 1 and getattr(node.args[0], "op", None) == "get_attr":
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    matmul_out = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        kind = type(mod).__name__
        if kind == "OnnxMatMul" and len(node.args) == 2:
            w = const(node.args[1])
            if w is not None and w.dim() == 2:  # x @ W -> F.linear(x, W.T)
                gm.add_submodule(node.target, MatMulLinear(w))
                w_node = node.args[1]
                node.args = (node.args[0],)
                if not w_node.users:
                    gm.graph.erase_node(w_node)
                promoted.append(f"{node.target}.weight")
                matmul_out.add(node)
                continue
            matmul_out.add(node)
        if kind in WEIGHT_OPS or kind in ("OnnxLayerNorm", "OnnxInstanceNorm"):
            for a in node.args:
                if const(a) is not None:
                    make_param(a)
        elif kind == "OnnxBatchNorm":
            for a in node.args[1:3]:  # scale, bias (not the running statistics)
                if const(a) is not None:
                    make_param(a)
        elif kind == "OnnxBinaryMathOperation" and mod.math_op_function is torch.add:
            a, b = node.args[:2]
            if a in matmul_out and const(b) is not None:
                make_param(b)
            elif b in matmul_out and const(a) is not None:
                make_param(a)
    # drop initializers nothing reads any more (the MatMul weights now in MatMulLinear)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(inits._buffers):
        if f"initializers.{name}" not in used:
            del inits._buffers[name]
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return promoted


def folded_norm_warning(path: str | Path, proto: Any) -> str | None:
    """The warning for a graph with convolutions and no normalisation operator, else None."""
    ops = {n.op_type for n in proto.graph.node}
    if not ops & set(CONV_OPS) or ops & set(NORM_OPS):
        return None
    return (
        f"{path}: the graph has convolutions and no normalisation; if the source model had "
        "BatchNorm after a conv, the exporter folded it into the conv's weights and this "
        "model trains without it (export with do_constant_folding=False and "
        "training=torch.onnx.TrainingMode.PRESERVE to keep it)"
    )


def _check_ort(path: Path, proto: Any, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ref = sess.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    for r, o in zip(ref, outs, strict=True):
        r_t = torch.from_numpy(np.asarray(r))
        scale = max(1.0, float(r_t.abs().max())) if r_t.numel() else 1.0
        diff = float((o.detach() - r_t).abs().max()) if r_t.numel() else 0.0
        if not diff <= 1e-4 * scale:
            raise OnnxInError(
                f"{path}: the converted module differs from onnxruntime (max abs diff "
                f"{diff:.3g}, output scale {scale:.3g})"
            )


def load_onnx(
    path: str | Path, input_shape: Sequence[int] | None = None, quiet: bool = False
) -> LoadedOnnx:
    """Convert the ONNX file at ``path`` to a trainable module (train mode), checked against
    onnxruntime. Warns (:class:`FoldedNormWarning`, unless ``quiet``) where a BatchNorm may
    have been folded."""
    path = Path(path)
    onnx2torch, get_converter = _onnx2torch()
    original = _read(path)
    opset = _opsets(original).get("ai.onnx", 0)
    proto = _downgrade(original)
    _check_operators(path, proto, get_converter, opset)
    inputs = _example_inputs(path, proto, input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx2torch's own notes on its converters
            gm = onnx2torch.convert(proto)
    except GHLError:
        raise
    except Exception as e:
        raise OnnxInError(f"{path}: cannot convert (opset {opset}): {describe(e)}") from None
    promoted = _promote(gm)
    _check_ort(path, original, gm, inputs)
    gm.train()
    if not quiet and (msg := folded_norm_warning(path, original)) is not None:
        warnings.warn(msg, FoldedNormWarning, stacklevel=2)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoadedOnnx(gm, inputs, path, sha, opset, promoted)


def onnx_source(
    path: str | Path, input_shape: Sequence[int] | None = None
) -> tuple[LoadedOnnx, tuple[torch.Tensor, ...], dict[str, Any]]:
    """What ``ghlc convert model.onnx`` needs: the converted model, its example inputs and the
    artifact's ``source`` record (the ONNX file by path and hash). A folded-BatchNorm warning
    is printed to stderr as ``warning: ...``."""
    import click

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FoldedNormWarning)
        loaded = load_onnx(path, input_shape)
    for w in caught:
        if issubclass(w.category, FoldedNormWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded, loaded.example_inputs, onnx_record(loaded)


def onnx_record(loaded: LoadedOnnx) -> dict[str, Any]:
    """What an artifact records of its ONNX source: the file by path and SHA-256."""
    return {"format": "onnx", "path": str(loaded.path.resolve()), "sha256": loaded.sha256}
