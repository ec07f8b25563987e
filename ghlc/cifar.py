"""All of CIFAR-10 from the shared JPEG file (``cifar10-jpeg.npz``), decoded once per process.

The file stores the 60,000 images as their JPEG bytes (``train_jpeg``/``train_offsets``,
``test_jpeg``/``test_offsets``) in class order. :func:`load_jpeg_npz` decodes them with Pillow
into uint8 NHWC arrays, shuffles each split with a fixed generator (so any prefix is roughly
balanced and every run sees the same order) and caches the result for the rest of the process.
:func:`load_uint8` gives the same uint8 view of an ordinary image ``.npz`` (``x_train`` ...),
which is what the device-resident training loop (:mod:`ghlc.resident`) takes.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GHLError

__all__ = [
    "JPEG_KEYS",
    "CLASSES",
    "JPEG_NAME",
    "SHUFFLE_SEED",
    "Uint8Set",
    "decode_jpegs",
    "find_data_file",
    "is_jpeg_npz",
    "load_jpeg_npz",
    "load_uint8",
]

JPEG_NAME = "cifar10-jpeg"  # the --data name of the shared file
JPEG_KEYS = ("train_jpeg", "train_offsets", "y_train", "test_jpeg", "test_offsets", "y_test")
SHUFFLE_SEED = 20260127  # the shared files' own drawing seed; fixed, so every run agrees
CLASSES = (  # CIFAR-10's class names, in label order
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class CifarError(GHLError, ValueError):
    """The JPEG set cannot be found, read or decoded."""


@dataclass(frozen=True)
class Uint8Set:
    """Images as uint8 NHWC (or NHW) numpy arrays, labels int64, in a fixed shuffled order."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    name: str


_CACHE: dict[tuple[str, int, int], Uint8Set] = {}


def default_data_dirs() -> list[Path]:
    """Where a data file named without a path is looked for: ``$GHLC_DATA_DIR``, then the
    ``shared/data`` folder beside this repository."""
    dirs = []
    if os.environ.get("GHLC_DATA_DIR"):
        dirs.append(Path(os.environ["GHLC_DATA_DIR"]))
    dirs.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    return dirs


def find_data_file(name: str, dirs: list[Path] | None = None) -> Path:
    """The path of ``name`` (``cifar10-jpeg`` or a file name) in ``dirs``; a one-line
    ``CifarError`` naming the places looked in when it is in none."""
    fname = name if name.endswith(".npz") else f"{name}.npz"
    dirs = default_data_dirs() if dirs is None else dirs
    for d in dirs:
        if (d / fname).is_file():
            return d / fname
    where = ", ".join(str(d) for d in dirs)
    raise CifarError(
        f"{name}: {fname} not found in {where}; pass its path (--data PATH/{fname}) "
        "or set GHLC_DATA_DIR to the folder holding it"
    )


def is_jpeg_npz(keys: set[str] | list[str]) -> bool:
    """Whether an ``.npz`` with these keys is the JPEG form (bytes and offsets)."""
    return "train_jpeg" in keys


def decode_jpegs(
    buf: np.ndarray, offsets: np.ndarray, index: np.ndarray | None = None, workers: int = 1
) -> np.ndarray:
    """Decode images ``index`` (default all) of a concatenated JPEG buffer to uint8 NHWC RGB.
    ``workers`` > 1 decodes on that many threads (Pillow releases the GIL while decoding)."""
    try:
        from PIL import Image
    except ImportError:  # a dependency of ghlc; only a broken install lacks it
        raise CifarError("decoding the JPEG set needs Pillow (pip install pillow)") from None
    idx = np.arange(len(offsets) - 1) if index is None else np.asarray(index)
    if len(idx) == 0:
        return np.zeros((0, 32, 32, 3), np.uint8)
    raw = np.ascontiguousarray(buf, dtype=np.uint8).tobytes()  # (an image is a small slice)
    offs = np.asarray(offsets).tolist()

    def one(i: int) -> np.ndarray:
        with Image.open(io.BytesIO(raw[offs[i] : offs[i + 1]])) as f:
            f.load()
            im = f if f.mode == "RGB" else f.convert("RGB")
            w, h = im.size
            return np.frombuffer(im.tobytes(), np.uint8).reshape(h, w, 3)

    first = one(int(idx[0]))
    out = np.empty((len(idx), *first.shape), np.uint8)
    out[0] = first

    def fill(lo: int, hi: int) -> None:
        for j in range(lo, hi):
            img = one(int(idx[j]))
            if img.shape != first.shape:
                raise CifarError(f"image {int(idx[j])} has shape {img.shape}, not {first.shape}")
            out[j] = img

    n = len(idx)
    if workers <= 1 or n < 1024:
        fill(1, n)
    else:
        bounds = np.linspace(1, n, workers + 1).astype(int)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, bounds[:-1], bounds[1:]))
    return out


def _decode_all(path: Path, workers: int) -> Uint8Set:
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in JPEG_KEYS if k not in d.files]
            if missing:
                raise CifarError(f"{path}: missing key(s) {', '.join(missing)}")
            a = {k: d[k] for k in JPEG_KEYS}
            classes = tuple(str(c) for c in d["classes"].tolist()) if "classes" in d.files else None
    except CifarError:
        raise
    except Exception as e:
        raise CifarError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    splits = []
    for s in ("train", "test"):
        offs, y = a[f"{s}_offsets"].astype(np.int64), a[f"y_{s}"].astype(np.int64)
        if offs.ndim != 1 or len(offs) != len(y) + 1 or offs[-1] > a[f"{s}_jpeg"].size:
            raise CifarError(f"{path}: {s}_offsets do not fit {s}_jpeg and y_{s}")
        try:
            x = decode_jpegs(a[f"{s}_jpeg"], offs, workers=workers)
        except CifarError:
            raise
        except Exception as e:
            raise CifarError(
                f"{path}: a {s} image cannot be decoded ({type(e).__name__})"
            ) from None
        perm = np.random.default_rng(SHUFFLE_SEED + (s == "test")).permutation(len(y))
        splits += [x[perm], y[perm]]
    if classes is None:
        classes = CLASSES
    xtr, ytr, xte, yte = splits
    return Uint8Set(xtr, ytr, xte, yte, classes=classes, name=path.stem)


def load_jpeg_npz(path: str | Path, workers: int | None = None) -> Uint8Set:
    """The JPEG set at ``path``, decoded (once per process and file) and shuffled.

    ``workers`` (default: torch's CPU thread count) threads decode; the arrays are shared by
    every call, so treat them as read-only."""
    p = Path(path)
    if not p.is_file():
        raise CifarError(f"{p}: data file not found")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        if workers is None:
            import torch

            workers = torch.get_num_threads()
        _CACHE[key] = _decode_all(p, max(1, workers))
    return _CACHE[key]


def load_uint8(spec: str | Path) -> Uint8Set:
    """uint8 images of ``spec``: ``cifar10-jpeg`` (looked up as :func:`find_data_file`
    does), the JPEG ``.npz``, or an image ``.npz`` with uint8 ``x_train``/``x_test``."""
    spec = str(spec)
    p = find_data_file(spec) if spec == JPEG_NAME else Path(spec)
    if not p.is_file():
        raise CifarError(f"{p}: data file not found")
    try:
        with np.load(p, allow_pickle=False) as d:
            keys = set(d.files)
            if is_jpeg_npz(keys):
                jpeg = True
            else:
                jpeg = False
                need = ["x_train", "y_train", "x_test", "y_test"]
                missing = [k for k in need if k not in keys]
                if missing:
                    raise CifarError(f"{p}: missing key(s) {', '.join(missing)}")
                arr = {k: d[k] for k in need}
                classes = [str(c) for c in d["classes"].tolist()] if "classes" in keys else None
    except CifarError:
        raise
    except Exception as e:
        raise CifarError(f"{p}: not a readable .npz file ({type(e).__name__})") from None
    if jpeg:
        return load_jpeg_npz(p)
    for k in ("x_train", "x_test"):
        if arr[k].dtype != np.uint8 or arr[k].ndim not in (3, 4):
            raise CifarError(f"{p}: {k} is {arr[k].dtype} {arr[k].shape}, not uint8 NHWC or NHW")
    ys = [arr["y_train"].astype(np.int64), arr["y_test"].astype(np.int64)]
    if classes is None:
        classes = [str(i) for i in range(int(max(ys[0].max(), ys[1].max())) + 1)]
    return Uint8Set(arr["x_train"], ys[0], arr["x_test"], ys[1], tuple(classes), p.stem)
