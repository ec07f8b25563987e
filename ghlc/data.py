"""Image datasets for training and scoring: scikit-learn digits, .npz files, CIFAR folders.

``load_data(spec, input_shape)`` returns a :class:`DataSet` of float32 NCHW tensors, resized
and channel-repeated to the model's per-sample input shape and normalised per channel with
the training split's mean and std. Nothing here unpickles arbitrary objects: ``.npz`` files
are read with ``allow_pickle=False`` and CIFAR python batches with a restricted unpickler.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cifar
from .errors import GHLError

__all__ = ["DataError", "DataSet", "augment_batch", "load_data"]


class DataError(GHLError, ValueError):
    """A data set that cannot be loaded: missing, damaged or of the wrong shape."""


@dataclass
class DataSet:
    x_train: torch.Tensor  # float32 NCHW, normalised
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per channel, from the training split (before normalising)
    std: tuple[float, ...]
    name: str
    augment: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- public API


def load_data(
    spec: str,
    input_shape: tuple[int, ...],
    augment: bool = False,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataSet:
    """Load ``spec`` (``digits`` | ``cifar10-jpeg`` | ``FILE.npz`` | ``cifar10:DIR`` |
    ``cifar100:DIR``) shaped to ``input_shape`` = (C, H, W). ``cifar10-jpeg`` is all of
    CIFAR-10 from the shared JPEG file (:mod:`ghlc.cifar`). ``augment`` only marks the set:
    augmentation is applied per batch by :func:`augment_batch`. ``normalisation`` = (mean,
    std), one value per channel, normalises with those instead of the training split's (a
    trained model's own)."""
    shape = _check_shape(input_shape)
    spec = str(spec)
    if spec == "digits":
        raw = _digits()
    elif spec == cifar.JPEG_NAME:
        raw = _jpeg(spec)
    elif spec.startswith("cifar10:"):
        raw = _cifar(spec[len("cifar10:") :], fine100=False)
    elif spec.startswith("cifar100:"):
        raw = _cifar(spec[len("cifar100:") :], fine100=True)
    else:
        raw = _npz(spec)
    xtr, ytr, xte, yte, classes, name = raw
    return _finish(xtr, ytr, xte, yte, classes, name, shape, augment, normalisation)


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, per sample, on an
    NCHW batch. Deterministic for a given ``generator`` state."""
    if x.dim() != 4:
        raise DataError(f"augment_batch expects an NCHW batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    pad = 4
    gdev = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    cols_w = torch.where(flip[:, None], ar_w.flip(0)[None, :], ar_w[None, :])
    rows = oy[:, None] + ar_h[None, :]  # (N, H)
    cols = ox[:, None] + cols_w  # (N, W)
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------- sources


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        msg = "the 'digits' data set needs scikit-learn (pip install scikit-learn)"
        raise DataError(msg) from None
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(round(0.8 * len(y)))
    tr, te = perm[:cut], perm[cut:]
    classes = [str(i) for i in range(10)]
    return x[tr], y[tr], x[te], y[te], classes, "digits"


def _npz(spec: str):
    p = Path(spec)
    if not p.is_file():
        raise DataError(
            f"{spec}: data file not found (expected digits, cifar10-jpeg, FILE.npz, "
            "cifar10:DIR or cifar100:DIR)"
        )
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    if magic != b"PK\x03\x04":
        raise DataError(f"{p}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(p, allow_pickle=False) as d:
            keys = set(d.files)
            if cifar.is_jpeg_npz(keys):
                return _jpeg(p)
            need = ["x_train", "y_train", "x_test", "y_test"]
            missing = [k for k in need if k not in keys]
            if missing:
                raise DataError(f"{p}: missing key(s) {', '.join(missing)}")
            arrs = {k: d[k] for k in need}
            classes = [str(c) for c in d["classes"].tolist()] if "classes" in keys else None
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{p}: holds pickled objects, which are not loaded") from None
        raise DataError(f"{p}: not a readable .npz file ({e})") from None
    except Exception as e:
        raise DataError(f"{p}: not a readable .npz file ({type(e).__name__})") from None
    xtr = _images(arrs["x_train"], f"{p.name} x_train")
    xte = _images(arrs["x_test"], f"{p.name} x_test")
    return xtr, arrs["y_train"], xte, arrs["y_test"], classes, p.stem


def _jpeg(spec: str | Path):
    """The JPEG CIFAR-10 file (a path, or its name looked up in the shared data folder)."""
    try:
        u8 = cifar.load_uint8(spec)  # decoded once per process
    except cifar.CifarError as e:
        raise DataError(str(e)) from None
    xs = [_images(x, u8.name) for x in (u8.x_train, u8.x_test)]
    return xs[0], u8.y_train, xs[1], u8.y_test, list(u8.classes), u8.name


def _images(a: np.ndarray, what: str) -> np.ndarray:
    """uint8 NHWC / NHW, or float NCHW / NHW -> float32 NCHW in the file's value range
    (uint8 scaled to [0, 1])."""
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[:, None]
        elif a.ndim == 4:
            a = a.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"{what}: wrong image shape {a.shape} (expected uint8 NHWC or NHW)")
        return np.ascontiguousarray(a).astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        if a.ndim == 3:
            a = a[:, None]
        elif a.ndim != 4:
            raise DataError(f"{what}: wrong image shape {a.shape} (expected float NCHW)")
        return a.astype(np.float32, copy=False)
    raise DataError(f"{what}: images have dtype {a.dtype} (expected uint8 or float)")


_C10_BIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
_C10_PY = [f"data_batch_{i}" for i in range(1, 6)]
_C10_NAMES = list(cifar.CLASSES)


def _cifar(folder: str, fine100: bool):
    kind = "cifar100" if fine100 else "cifar10"
    root = Path(folder)
    if not folder or not root.is_dir():
        raise DataError(f"{kind}:{folder}: folder not found")
    if fine100:
        subs = ["cifar-100-binary", "cifar-100-python"]
        bin_files, py_files = ["train.bin", "test.bin"], ["train", "test"]
    else:
        subs = ["cifar-10-batches-bin", "cifar-10-batches-py"]
        bin_files, py_files = _C10_BIN + ["test_batch.bin"], _C10_PY + ["test_batch"]
    for d in [root] + [root / s for s in subs]:
        if all((d / f).is_file() for f in bin_files):
            return _cifar_bin(d, fine100, kind)
        if all((d / f).is_file() for f in py_files):
            return _cifar_py(d, fine100, kind)
    want = ", ".join(bin_files) + " (binary) or " + ", ".join(py_files) + " (python)"
    raise DataError(f"{kind}:{folder}: not an official {kind} folder, missing {want}")


def _cifar_bin(d: Path, fine100: bool, kind: str):
    nlab = 2 if fine100 else 1
    rec = nlab + 3072

    def read(files):
        xs, ys = [], []
        for f in files:
            b = np.fromfile(d / f, dtype=np.uint8)
            if b.size == 0 or b.size % rec:
                raise DataError(
                    f"{d / f}: size {b.size} is not a multiple of the {kind} record size {rec}"
                )
            b = b.reshape(-1, rec)
            ys.append(b[:, nlab - 1].astype(np.int64))
            xs.append(b[:, nlab:].reshape(-1, 3, 32, 32))
        return np.concatenate(xs), np.concatenate(ys)

    if fine100:
        xtr, ytr = read(["train.bin"])
        xte, yte = read(["test.bin"])
        classes = _names_txt(d / "fine_label_names.txt")
    else:
        xtr, ytr = read(_C10_BIN)
        xte, yte = read(["test_batch.bin"])
        classes = _names_txt(d / "batches.meta.txt")
    classes = classes or (_C10_NAMES if not fine100 else None)
    return _u8(xtr), ytr, _u8(xte), yte, classes, kind


def _names_txt(p: Path) -> list[str] | None:
    if not p.is_file():
        return None
    names = [s.strip() for s in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [s for s in names if s] or None


def _u8(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _latin1_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in (
        "latin1",
        "latin-1",
        "iso-8859-1",
    ):
        raise pickle.UnpicklingError(f"refusing to encode with codec {encoding!r}")
    return text.encode("latin-1")


class _SafeUnpickler(pickle.Unpickler):
    """Loads only plain containers and numpy arrays: any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles from Python 3
            return _latin1_encode  # store bytes; only the latin-1 codec is honoured
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core."):
                module = "numpy._core." + module[len("numpy.core.") :]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _safe_load(p: Path):
    try:
        with open(p, "rb") as fh:
            data = fh.read()
        obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{p}: not a plain CIFAR batch ({e})") from None
    except Exception as e:
        raise DataError(f"{p}: not a readable CIFAR batch ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{p}: not a CIFAR batch (holds {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_py(d: Path, fine100: bool, kind: str):
    lab_key = "fine_labels" if fine100 else "labels"

    def read(files):
        xs, ys = [], []
        for f in files:
            b = _safe_load(d / f)
            missing = [k for k in ("data", lab_key) if k not in b]
            if missing:
                raise DataError(f"{d / f}: missing key(s) {', '.join(missing)}")
            x = np.asarray(b["data"])
            y = np.asarray(b[lab_key], dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(
                    f"{d / f}: wrong image shape {x.shape} {x.dtype} (expected uint8 (N, 3072))"
                )
            if len(x) != len(y):
                raise DataError(f"{d / f}: {len(x)} images but {len(y)} labels")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    if fine100:
        xtr, ytr = read(["train"])
        xte, yte = read(["test"])
        meta, key = d / "meta", "fine_label_names"
    else:
        xtr, ytr = read(_C10_PY)
        xte, yte = read(["test_batch"])
        meta, key = d / "batches.meta", "label_names"
    classes = None
    if meta.is_file():
        m = _safe_load(meta)
        if key in m:
            classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in m[key]]
    classes = classes or (_C10_NAMES if not fine100 else None)
    return _u8(xtr), ytr, _u8(xte), yte, classes, kind


# --------------------------------------------------------------------------- shaping


def _check_shape(input_shape) -> tuple[int, int, int]:
    try:
        s = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise DataError(f"model input shape {input_shape!r} is not a tuple of ints") from None
    if len(s) == 4:
        s = s[1:]
    if len(s) != 3 or min(s) < 1:
        raise DataError(f"model input shape {s} is not an image shape (C, H, W)")
    return s


def _labels(y, n: int, what: str, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{name}: {what} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DataError(f"{name}: {n} images but {len(y)} labels in {what}")
    return y.astype(np.int64)


def _finish(xtr, ytr, xte, yte, classes, name, shape, augment, normalisation=None) -> DataSet:
    ytr = _labels(ytr, len(xtr), "y_train", name)
    yte = _labels(yte, len(xte), "y_test", name)
    if len(xtr) == 0:
        raise DataError(f"{name}: the training split is empty")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{name}: train images {xtr.shape[1:]} and test images {xte.shape[1:]} differ in shape"
        )
    ally = np.concatenate([ytr, yte])
    if ally.size and ally.min() < 0:
        raise DataError(f"{name}: negative label {int(ally.min())}")
    if classes is None:
        classes = [str(i) for i in range(int(ally.max()) + 1 if ally.size else 0)]
    if ally.size and ally.max() >= len(classes):
        raise DataError(f"{name}: label {int(ally.max())} out of range for {len(classes)} classes")
    c, h, w = shape
    cin = xtr.shape[1]
    if cin != c and cin != 1:
        raise DataError(f"{name}: images have {cin} channels but the model takes {c}")
    xtr_t = _shape_to(torch.from_numpy(np.ascontiguousarray(xtr)), c, h, w)
    xte_t = _shape_to(torch.from_numpy(np.ascontiguousarray(xte)), c, h, w)
    if normalisation is not None:
        if len(normalisation[0]) != c or len(normalisation[1]) != c:
            raise DataError(f"{name}: the normalisation given is not for {c} channels")
        mean = torch.tensor(normalisation[0], dtype=torch.float64)
        std = torch.tensor(normalisation[1], dtype=torch.float64)
    else:
        mean = xtr_t.mean(dim=(0, 2, 3), dtype=torch.float64)
        std = xtr_t.to(torch.float64).std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-8)
    m4 = mean.float().view(1, c, 1, 1)
    s4 = std.float().view(1, c, 1, 1)
    xtr_t.sub_(m4).div_(s4)
    xte_t.sub_(m4).div_(s4)
    return DataSet(
        x_train=xtr_t,
        y_train=torch.from_numpy(ytr),
        x_test=xte_t,
        y_test=torch.from_numpy(yte),
        classes=list(classes),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        name=name,
        augment=bool(augment),
    )


def _shape_to(x: torch.Tensor, c: int, h: int, w: int, chunk: int = 4096) -> torch.Tensor:
    """float NCHW -> float32 (N, c, h, w): bilinear resize if needed, then 1 -> c channels."""
    x = x.float()
    if tuple(x.shape[2:]) != (h, w):
        shrink = h < x.shape[2] or w < x.shape[3]
        parts = [
            F.interpolate(
                x[i : i + chunk],
                size=(h, w),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
            for i in range(0, len(x), chunk)
        ]
        x = torch.cat(parts) if parts else x.new_zeros((0, x.shape[1], h, w))
    if x.shape[1] != c:
        x = x.expand(-1, c, -1, -1)
    return x.contiguous()  # a fresh array (or one this module owns): normalised in place
