"""Inference ONNX export, checked against onnxruntime.

The model is exported in eval mode: a ghlc-prepared module in eval mode runs the plain
model, so the graph holds no Hebbian work. The file is written to a temporary name in the
output folder and renamed into place only after onnxruntime reproduced the torch outputs.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import GHLError, first_line
from .fileio import atomic_path

__all__ = ["ExportError", "ExportReport", "export_onnx"]


class ExportError(GHLError):
    """The model could not be exported, or the exported file does not match torch."""


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    scale: float  # max(1, max |reference output|): the tolerance is rtol * scale
    providers: list[str]
    opset: int


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    example_inputs: Sequence | torch.Tensor,
    opset: int | None = None,
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
    rtol: float = 1e-4,
) -> ExportReport:
    """Export ``model`` (eval mode) to ONNX at ``path`` and check it with onnxruntime."""
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError("example_inputs must be a tensor or a sequence of tensors")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"{path}: cannot write to folder {path.parent} ({e.strerror or type(e).__name__})"
        ) from None
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path, ExportError) as tmp:
            try:
                diff, scale, providers, used_opset = _export_checked(
                    model, inputs, tmp, opset, dynamic_batch, metadata, rtol
                )
            except (ExportError, OSError):
                raise
            except Exception as e:
                raise ExportError(f"export failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        model.train(was_training)
    return ExportReport(
        path=path, max_abs_diff=diff, scale=scale, providers=providers, opset=int(used_opset)
    )


# --------------------------------------------------------------------------- helpers


def _export_checked(model, inputs, tmp: Path, opset, dynamic_batch, metadata, rtol):
    """Export to ``tmp``, add the metadata, and check the file against torch's outputs."""
    import onnx

    from .version import __version__

    with torch.no_grad(), _no_tf32():
        ref = _flat_outputs(model(*inputs))
    if not ref:
        raise ExportError("the model returns no tensor outputs")
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    out_names = ["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))]
    _torch_export(model, inputs, tmp, opset, dynamic_batch, in_names, out_names)
    try:
        proto = onnx.load(str(tmp))
    except Exception as e:
        raise ExportError(f"the exporter wrote an unreadable file ({type(e).__name__})") from None
    _check_no_hebbian(proto)
    md = {"ghlc_version": __version__, "torch_version": torch.__version__}
    md.update({str(k): str(v) for k, v in (metadata or {}).items()})
    onnx.helper.set_model_props(proto, md)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"exported graph fails the ONNX checker: {_first_line(e)}") from None
    onnx.save(proto, str(tmp))
    used_opset = next(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset or 0
    )
    diff, scale, providers = _check_ort(tmp, inputs, ref, in_names, rtol)
    if dynamic_batch:
        _check_other_batch(model, tmp, inputs, in_names, rtol)
    return diff, scale, providers, used_opset


def _first_line(e: BaseException) -> str:
    return first_line(e) or type(e).__name__


@contextlib.contextmanager
def _no_tf32():
    """Full float32 precision on CUDA for the reference outputs."""
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _flat_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def _torch_export(model, inputs, tmp: Path, opset, dynamic_batch, in_names, out_names) -> None:
    """TorchScript exporter first (dynamo=False), then the dynamo exporter."""
    errors = []
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                inputs,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
            return
        except OSError:  # a write failure (full disk), not the exporter's limit
            raise
        except Exception as e:
            errors.append(f"TorchScript exporter: {type(e).__name__}: {_first_line(e)}")
        try:
            kw: dict[str, Any] = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                kw["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
            torch.onnx.export(
                model,
                inputs,
                str(tmp),
                dynamo=True,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                **kw,
            )
            return
        except OSError:
            raise
        except Exception as e:
            errors.append(f"dynamo exporter: {type(e).__name__}: {_first_line(e)}")
    raise ExportError("torch.onnx.export failed; " + "; ".join(errors))


def _check_no_hebbian(proto) -> None:
    def walk(graph):
        for node in graph.node:
            for s in (node.name, node.op_type, node.domain):
                if "hebb" in (s or "").lower():
                    raise ExportError(
                        f"exported graph holds a Hebbian node ({node.name or ''} "
                        f"{node.op_type}); export needs the inference graph"
                    )
            for a in node.attribute:
                if a.g is not None and a.HasField("g"):
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(proto.graph)


def _session(path: Path):
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail:
        attempts = [
            [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CPUExecutionProvider"],
        ]
    else:
        attempts = [["CPUExecutionProvider"]]
    err: Exception | None = None
    for prov in attempts:
        try:
            return ort.InferenceSession(str(path), providers=prov)
        except Exception as e:  # an option or provider this build lacks: try the next one
            err = e
    assert err is not None  # attempts is never empty
    raise ExportError(f"onnxruntime cannot load the exported file: {_first_line(err)}")


def _run(sess, inputs, in_names) -> list[np.ndarray]:
    feed = {n: t.detach().cpu().numpy() for n, t in zip(in_names, inputs)}
    try:
        return sess.run(None, feed)
    except Exception as e:
        raise ExportError(
            f"onnxruntime failed to run the exported graph: {_first_line(e)}"
        ) from None


def _compare(got, ref: list[torch.Tensor], rtol: float, what: str) -> tuple[float, float]:
    if len(got) != len(ref):
        raise ExportError(f"{what}: onnxruntime gives {len(got)} outputs, torch {len(ref)}")
    diff, scale = 0.0, 1.0
    for g, t in zip(got, ref):
        r = t.detach().cpu().numpy()
        if tuple(g.shape) != tuple(r.shape):
            raise ExportError(
                f"{what}: onnxruntime output shape {tuple(g.shape)} differs from "
                f"torch {tuple(r.shape)}"
            )
        if r.size:
            rd = r.astype(np.float64)
            diff = max(diff, float(np.max(np.abs(g.astype(np.float64) - rd))))
            scale = max(scale, float(np.max(np.abs(rd))))
    if not np.isfinite(diff) or diff > rtol * scale:
        raise ExportError(
            f"{what}: onnxruntime differs from torch by {diff:.3g} (limit {rtol:g} x {scale:.3g})"
        )
    return diff, scale


def _check_ort(tmp: Path, inputs, ref, in_names, rtol):
    sess = _session(tmp)
    diff, scale = _compare(_run(sess, inputs, in_names), ref, rtol, "exported graph")
    return diff, scale, list(sess.get_providers())


def _check_other_batch(model, tmp: Path, inputs, in_names, rtol) -> None:
    """A dynamic-batch graph must also run another batch size: try batch + 1 samples."""
    if not all(t.dim() >= 1 and t.shape[0] >= 1 for t in inputs):
        return
    g = torch.Generator().manual_seed(0)
    more = tuple(
        torch.cat([t, t[:1] + 0.5 * torch.randn(t[:1].shape, generator=g).to(t)])
        if t.is_floating_point()
        else torch.cat([t, t[:1]])
        for t in inputs
    )
    with torch.no_grad(), _no_tf32():
        ref = _flat_outputs(model(*more))
    sess = _session(tmp)
    _compare(_run(sess, more, in_names), ref, rtol, "exported graph at another batch size")
