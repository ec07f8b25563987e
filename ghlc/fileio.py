"""Atomic file output: a file appears whole under its name, or not at all.

Every file ghlc writes (artifacts, checkpoints, metrics, plots, ONNX) goes through here. The
bytes go to a temporary file in the target's folder, which is renamed over the target only
once they are all on disk; any failure (a full disk, a file-size limit, an interrupt) removes
the temporary file and leaves the target as it was. Serialisers write to memory first, so a
failed write is always the operating system's ``OSError`` and its message names the reason
("No space left on device") instead of a serialiser's internal check.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from .errors import GHLError

__all__ = ["atomic_path", "write_atomic"]


def _check_folder(path: Path, error: type[GHLError] = GHLError) -> Path:
    d = path.parent if str(path.parent) else Path(".")
    if not d.is_dir():
        raise error(f"{path}: directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise error(f"{path}: directory {d} is not writable")
    return d


def _create_temp(path: Path, d: Path) -> tuple[int, Path]:
    # Mode 0o666 under the process umask, as open() gives (mkstemp would give 0o600).
    for _ in range(100):
        tmp = d / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise GHLError(f"{path}: cannot create a temporary file in {d}")


def _write_error(path: Path, e: OSError, error: type[GHLError] = GHLError) -> GHLError:
    return error(f"{path}: cannot write: {e.strerror or type(e).__name__}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, error: type[GHLError] = GHLError) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    For writers that need a file name (``torch.onnx.export``). An ``OSError`` in the block
    becomes a one-line ``error`` naming ``path``; the temporary file never survives.
    """
    path = Path(path)
    d = _check_folder(path, error)
    try:
        fd, tmp = _create_temp(path, d)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e, error) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e, error) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, synced to disk before the rename.

    A failure (full disk, no permission, ...) raises a one-line :class:`GHLError` naming
    ``path`` and the reason, and leaves ``path`` as it was.
    """
    buf = memoryview(data.encode() if isinstance(data, str) else data)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            while buf:
                buf = buf[os.write(fd, buf) :]
            os.fsync(fd)
        finally:
            os.close(fd)
