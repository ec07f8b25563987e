"""ghlc.cifar: the JPEG CIFAR-10 file decoded once, shuffled, equal to the subset's pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from ghlc import cifar
from ghlc.data import DataError, load_data

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
JPEG = SHARED / "cifar10-jpeg.npz"
SUBSET = SHARED / "cifar10-subset.npz"


def _jpeg_npz(path: Path, n_train: int = 20, n_test: int = 10) -> np.ndarray:
    """A small file in the shared JPEG layout (class-ordered); returns the source pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    pixels = []
    for split, n in (("train", n_train), ("test", n_test)):
        blocks = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)  # smooth: JPEG keeps it
        imgs = blocks.repeat(8, axis=1).repeat(8, axis=2)
        pixels.append(imgs)
        blobs = []
        for im in imgs:
            b = io.BytesIO()
            Image.fromarray(im).save(b, format="JPEG", quality=75)
            blobs.append(np.frombuffer(b.getvalue(), np.uint8))
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
        out[f"y_{split}"] = np.arange(n, dtype=np.int64) * 10 // n  # class-ordered
    np.savez(path, classes=np.array([f"c{i}" for i in range(10)]), **out)
    return pixels[0]


def test_decoded_once_per_process_and_shuffled(tmp_path, monkeypatch):
    p = tmp_path / "tiny-jpeg.npz"
    src = _jpeg_npz(p)
    calls = []
    real = cifar._decode_all
    monkeypatch.setattr(cifar, "_decode_all", lambda *a: calls.append(a) or real(*a))
    a = cifar.load_jpeg_npz(p)
    b = cifar.load_uint8(str(p))
    ds = load_data(str(p), (3, 32, 32))  # the CLI's path goes through the same cache
    assert len(calls) == 1 and a is b
    assert a.x_train.dtype == np.uint8 and a.x_train.shape == (20, 32, 32, 3)
    assert a.x_test.shape == (10, 32, 32, 3) and a.classes[3] == "c3"
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.classes[0] == "c0"
    # shuffled with the fixed generator: not in class order, labels still with their images
    perm = np.random.default_rng(cifar.SHUFFLE_SEED).permutation(20)
    assert not np.array_equal(a.y_train, np.sort(a.y_train))
    assert np.array_equal(a.y_train, (np.arange(20) * 10 // 20)[perm])
    # JPEG at quality 75 is lossy, but every decoded image is near its own source
    err = np.abs(a.x_train.astype(int) - src[perm].astype(int)).mean(axis=(1, 2, 3))
    other = np.abs(a.x_train.astype(int) - src[perm][::-1].astype(int)).mean(axis=(1, 2, 3))
    assert err.max() < 20 and other.min() > 2 * err.max()


def test_errors_name_the_file(tmp_path):
    with pytest.raises(cifar.CifarError, match="not found"):
        cifar.load_jpeg_npz(tmp_path / "none.npz")
    with pytest.raises(cifar.CifarError, match=r"cifar10-jpeg\.npz not found in .*GHLC_DATA_DIR"):
        cifar.find_data_file("cifar10-jpeg", [tmp_path])
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_jpeg=np.zeros(3, np.uint8), y_train=np.zeros(1))
    with pytest.raises(DataError, match="missing key"):
        load_data(str(bad), (3, 32, 32))


@pytest.mark.skipif(not (JPEG.is_file() and SUBSET.is_file()), reason="shared data absent")
def test_jpeg_pixels_equal_the_subset():
    """The data README: decoded with Pillow, the JPEG file's images are the subset's pixels
    (subset image of class c, index k in class = JPEG image c*5000+k, or c*1000+k in test)."""
    sub = np.load(SUBSET)
    with np.load(JPEG) as d:
        for split, per_class, n in (("train", 5000, 120), ("test", 1000, 80)):
            y = sub[f"y_{split}"][:n]
            k = sub[f"{split}_index_in_class"][:n].astype(np.int64)
            idx = y * per_class + k
            assert np.array_equal(d[f"y_{split}"][idx], y)
            x = cifar.decode_jpegs(d[f"{split}_jpeg"], d[f"{split}_offsets"], idx, workers=2)
            assert x.shape == (n, 32, 32, 3)
            assert np.array_equal(x, sub[f"x_{split}"][:n])


def test_the_name_finds_the_shared_file(tmp_path, monkeypatch):
    _jpeg_npz(tmp_path / "cifar10-jpeg.npz", n_train=12, n_test=6)
    monkeypatch.setenv("GHLC_DATA_DIR", str(tmp_path))
    ds = load_data("cifar10-jpeg", (3, 32, 32))
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.y_test.shape == (6,)
    assert ds.name == "cifar10-jpeg"
