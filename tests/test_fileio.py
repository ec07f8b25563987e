"""Atomic writes: the target is whole or untouched, never half-written, whatever fails."""

import errno
import os

import pytest

from ghlc.errors import GHLError
from ghlc.fileio import atomic_path, write_atomic


def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_write_replaces_whole_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        p = tmp_path / "a.txt"
        write_atomic(p, "first")
        write_atomic(p, b"second" * 1000)
    finally:
        os.umask(old)
    assert p.read_bytes() == b"second" * 1000
    assert p.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"old")
    real_write, calls = os.write, []

    def write(fd, data):  # the first chunk lands, then the disk is full
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:10]))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(GHLError, match=r"ckpt.pt: cannot write: No space left on device$"):
        write_atomic(p, b"x" * 100)
    assert calls == [100, 90]
    assert p.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_missing_or_read_only_folder(tmp_path):
    with pytest.raises(GHLError, match="does not exist"):
        write_atomic(tmp_path / "no" / "a.txt", "x")
    with pytest.raises(GHLError, match="does not exist"), atomic_path(tmp_path / "no" / "b"):
        pass


@pytest.mark.parametrize("exc", [ValueError("exporter failed"), KeyboardInterrupt()])
def test_atomic_path_removes_the_temporary_file(tmp_path, exc):
    target = tmp_path / "m.onnx"
    with pytest.raises(type(exc)), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        raise exc
    assert not target.exists() and leftovers(tmp_path) == []


def test_atomic_path_names_the_target_on_an_os_error(tmp_path):
    with (
        pytest.raises(GHLError, match=r"m.onnx: cannot write: File too large$"),
        atomic_path(tmp_path / "m.onnx"),
    ):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    assert leftovers(tmp_path) == []
    with atomic_path(tmp_path / "m.onnx") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "m.onnx").read_bytes() == b"whole" and leftovers(tmp_path) == []
