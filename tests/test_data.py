"""ghlc.data: digits, .npz files, CIFAR folders (binary and python), validation, augmentation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ghlc.data import DataError, DataSet, augment_batch, load_data
from ghlc.errors import GHLError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _normalised(ds: DataSet) -> None:
    m = ds.x_train.mean(dim=(0, 2, 3))
    s = ds.x_train.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(m, torch.zeros_like(m), atol=1e-4)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-3)


def test_digits_shapes_and_normalisation():
    ds = load_data("digits", (1, 8, 8))
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.classes == [str(i) for i in range(10)] and ds.name == "digits"
    assert len(ds.mean) == 1 and len(ds.std) == 1 and 0 < ds.mean[0] < 1
    _normalised(ds)
    again = load_data("digits", (1, 8, 8))
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)


def test_digits_resized_and_channel_repeated():
    ds = load_data("digits", (3, 16, 16), augment=True)
    assert ds.x_train.shape == (1438, 3, 16, 16) and ds.augment
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])
    assert len(ds.mean) == 3
    _normalised(ds)
    ds4 = load_data("digits", (1, 3, 16, 16))  # a batch dim is stripped
    assert ds4.x_test.shape == (359, 3, 16, 16)


def _save(p: Path, **arrays) -> Path:
    np.savez(p, **arrays)
    return p


def test_npz_round_trip_uint8_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    ytr = rng.integers(0, 3, 20)
    yte = np.array([0, 1, 2, 1, 0])
    p = _save(
        tmp_path / "toy.npz",
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        classes=np.array(["cat", "dog", "emu"]),
    )
    ds = load_data(str(p), (3, 6, 6))
    assert ds.classes == ["cat", "dog", "emu"] and ds.name == "toy"
    assert ds.y_train.tolist() == ytr.tolist() and ds.y_test.tolist() == yte.tolist()
    mean = (xtr / 255.0).mean(axis=(0, 1, 2))
    std = (xtr / 255.0).std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(ds.std, std, rtol=1e-5)
    back = ds.x_test * torch.tensor(ds.std).view(1, 3, 1, 1) + torch.tensor(ds.mean).view(
        1, 3, 1, 1
    )
    np.testing.assert_allclose(back.permute(0, 2, 3, 1).numpy(), xte / 255.0, atol=1e-5)


def test_npz_nhw_and_float_nchw(tmp_path):
    rng = np.random.default_rng(1)
    p = _save(
        tmp_path / "g.npz",
        x_train=rng.integers(0, 256, (8, 10, 10), dtype=np.uint8),
        y_train=np.arange(8) % 4,
        x_test=rng.integers(0, 256, (4, 10, 10), dtype=np.uint8),
        y_test=np.arange(4),
    )
    ds = load_data(str(p), (3, 5, 5))
    assert ds.x_train.shape == (8, 3, 5, 5) and ds.classes == ["0", "1", "2", "3"]
    f = _save(
        tmp_path / "f.npz",
        x_train=rng.standard_normal((6, 2, 4, 4)).astype(np.float32),
        y_train=np.zeros(6, dtype=np.int64),
        x_test=rng.standard_normal((2, 2, 4, 4)),
        y_test=np.zeros(2, dtype=np.int64),
    )
    ds = load_data(str(f), (2, 4, 4))
    assert ds.x_test.shape == (2, 2, 4, 4) and ds.x_test.dtype == torch.float32
    _normalised(ds)


def _good(**over):
    rng = np.random.default_rng(2)
    d = dict(
        x_train=rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
        y_train=np.arange(6) % 2,
        x_test=rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
        y_test=np.array([0, 1, 1]),
    )
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize(
    "over, msg",
    [
        (dict(x_test=None, y_test=None), "missing key(s) x_test, y_test"),
        (dict(y_train=np.arange(5) % 2), "6 images but 5 labels"),
        (dict(y_test=np.array([0, -1, 1])), "negative label -1"),
        (dict(y_test=np.array([0, 1, 7]), classes=np.array(["a", "b"])), "label 7 out of range"),
        (dict(x_train=np.zeros((6, 4), np.uint8)), "wrong image shape"),
        (dict(x_train=np.zeros((6, 1, 4, 4, 1), np.float32)), "wrong image shape"),
        (dict(x_test=np.zeros((3, 5, 5), np.uint8)), "differ in shape"),
        (
            dict(x_train=np.zeros((6, 4, 4, 2), np.uint8), x_test=np.zeros((3, 4, 4, 2), np.uint8)),
            "2 channels but the model takes 3",
        ),
        (dict(y_train=np.linspace(0, 1, 6)), "1-D integer array"),
        (dict(x_train=np.zeros((6, 4, 4), np.int32)), "dtype int32"),
    ],
)
def test_npz_bad_inputs(tmp_path, over, msg):
    p = _save(tmp_path / "bad.npz", **_good(**over))
    with pytest.raises(DataError) as ei:
        load_data(str(p), (3, 4, 4))
    assert msg in str(ei.value) and "\n" not in str(ei.value)
    assert isinstance(ei.value, GHLError)


def test_missing_file_and_bad_specs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "nope.npz"), (1, 8, 8))
    with pytest.raises(DataError, match="folder not found"):
        load_data(f"cifar10:{tmp_path / 'nope'}", (3, 32, 32))
    with pytest.raises(DataError, match="not an official cifar10 folder"):
        load_data(f"cifar10:{tmp_path}", (3, 32, 32))
    with pytest.raises(DataError, match="not an image shape"):
        load_data("digits", (8, 8))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_data(str(junk), (1, 8, 8))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    p = _save(tmp_path / "obj.npz", **_good(classes=np.array([{"a": 1}, 2], dtype=object)))
    with pytest.raises(DataError, match="pickled"):
        load_data(str(p), (1, 4, 4))


@pytest.mark.skipif(not (SHARED / "mnist-subset.npz").is_file(), reason="shared data absent")
def test_shared_mnist():
    ds = load_data(str(SHARED / "mnist-subset.npz"), (1, 28, 28))
    assert ds.x_train.shape == (10000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.classes == [str(i) for i in range(10)]
    assert torch.bincount(ds.y_train).tolist() == [1000] * 10
    assert abs(ds.mean[0] - 0.1307) < 0.01 and abs(ds.std[0] - 0.3081) < 0.01
    _normalised(ds)
    small = load_data(str(SHARED / "mnist-subset.npz"), (3, 14, 14))
    assert small.x_test.shape == (10000, 3, 14, 14)


# --------------------------------------------------------------------------- CIFAR folders

NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_split(n, seed, ncls=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, ncls, n)


def _records(x, *labels):
    cols = [np.asarray(lab, dtype=np.uint8)[:, None] for lab in labels]
    return np.concatenate(cols + [x], axis=1).tobytes()


def test_cifar10_binary_folder(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    parts = []
    for i in range(1, 6):
        x, y = _fake_split(4, i)
        parts.append((x, y))
        (d / f"data_batch_{i}.bin").write_bytes(_records(x, y))
    xt, yt = _fake_split(3, 9)
    (d / "test_batch.bin").write_bytes(_records(xt, yt))
    (d / "batches.meta.txt").write_text("\n".join(NAMES10) + "\n\n")
    ds = load_data(f"cifar10:{tmp_path}", (3, 32, 32))  # finds the official subfolder
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.classes == NAMES10 and ds.name == "cifar10"
    assert ds.y_train.tolist() == np.concatenate([y for _, y in parts]).tolist()
    raw = ds.x_test * torch.tensor(ds.std).view(1, 3, 1, 1) + torch.tensor(ds.mean).view(1, 3, 1, 1)
    np.testing.assert_allclose(raw.reshape(3, -1).numpy(), xt / 255.0, atol=1e-5)
    (d / "test_batch.bin").write_bytes(_records(xt, yt)[:-7])
    with pytest.raises(DataError, match="not a multiple"):
        load_data(f"cifar10:{d}", (3, 32, 32))


def test_cifar100_binary_folder_uses_fine_labels(tmp_path):
    x, fine = _fake_split(6, 1, ncls=100)
    coarse = fine // 5
    (tmp_path / "train.bin").write_bytes(_records(x, coarse, fine))
    xt, ft = _fake_split(2, 2, ncls=100)
    (tmp_path / "test.bin").write_bytes(_records(xt, ft // 5, ft))
    (tmp_path / "fine_label_names.txt").write_text("\n".join(f"c{i}" for i in range(100)))
    ds = load_data(f"cifar100:{tmp_path}", (3, 16, 16))
    assert ds.y_train.tolist() == fine.tolist() and len(ds.classes) == 100
    assert ds.x_train.shape == (6, 3, 16, 16)


def _py_batch(p: Path, obj, protocol=2):
    p.write_bytes(pickle.dumps(obj, protocol=protocol))


def test_cifar10_python_folder(tmp_path):
    ys = []
    for i in range(1, 6):
        x, y = _fake_split(3, i)
        ys += y.tolist()
        _py_batch(
            tmp_path / f"data_batch_{i}",
            {
                b"batch_label": b"training batch",
                b"labels": y.tolist(),
                b"data": x,
                b"filenames": [b"a.png"] * 3,
            },
            protocol=2 + i % 4,
        )
    xt, yt = _fake_split(2, 7)
    _py_batch(tmp_path / "test_batch", {"labels": yt.tolist(), "data": xt})
    _py_batch(
        tmp_path / "batches.meta", {b"label_names": [n.encode() for n in NAMES10], b"num_vis": 3072}
    )
    ds = load_data(f"cifar10:{tmp_path}", (3, 32, 32))
    assert ds.y_train.tolist() == ys and ds.classes == NAMES10
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)


def test_cifar100_python_folder(tmp_path):
    x, f = _fake_split(4, 3, ncls=100)
    _py_batch(
        tmp_path / "train",
        {"fine_labels": f.tolist(), "coarse_labels": (f // 5).tolist(), "data": x},
    )
    xt, ft = _fake_split(2, 4, ncls=100)
    _py_batch(tmp_path / "test", {"fine_labels": ft.tolist(), "data": xt})
    _py_batch(tmp_path / "meta", {"fine_label_names": [f"n{i}" for i in range(100)]})
    ds = load_data(f"cifar100:{tmp_path}", (3, 32, 32))
    assert ds.y_test.tolist() == ft.tolist() and ds.classes[99] == "n99"


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_python_pickle_refuses_code(tmp_path):
    x, y = _fake_split(2, 1)
    for i in range(1, 6):
        _py_batch(tmp_path / f"data_batch_{i}", {"labels": y.tolist(), "data": x})
    _py_batch(tmp_path / "test_batch", {"labels": y.tolist(), "data": x, "evil": _Boom()})
    with pytest.raises(DataError, match="refusing to load global"):
        load_data(f"cifar10:{tmp_path}", (3, 32, 32))
    _py_batch(tmp_path / "test_batch", {"data": x})
    with pytest.raises(DataError, match="missing key"):
        load_data(f"cifar10:{tmp_path}", (3, 32, 32))


# --------------------------------------------------------------------------- augmentation


def test_augment_batch():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    ones = torch.ones(64, 1, 8, 8)
    out = augment_batch(ones, torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert (out == 0).any() and (out == 1).sum() >= 64 * 16  # crops shift by at most 4 px
    # with 4-px padding a crop keeps the centre pixel's 4x4 neighbourhood inside the image
    row = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(64, 1, 8, 8)
    out = augment_batch(row.contiguous(), torch.Generator().manual_seed(2))
    mid = out[:, 0, 4]
    steps = mid[:, 3:5].diff(dim=1).squeeze(1)
    assert (steps == 1).any() and (steps == -1).any()  # some flipped, some not
    with pytest.raises(DataError):
        augment_batch(torch.ones(3, 8, 8))
