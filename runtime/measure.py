"""Kernels chosen by measurement: time exact candidates on the real shapes, keep the fastest.

Where several kernels give the same numbers (the correlation sum y.x as one weight-gradient
call, as a forward conv, or a block of output units at a time), the fastest one depends on the
machine, so the runtime asks :func:`choose` at the first training step. Like cuDNN's benchmark
mode, it calls each candidate once to warm up, then ``policy.current().measure_repeats`` timed
calls each (taking turns; CUDA synchronised around every call; under ``torch.no_grad()``), and
keeps the candidate with the smallest median time; a tie goes to the static choice.

A choice is kept per full key: the operation name, the caller's ``key`` (device type and index,
dtype, shapes and memory formats of the operands: :func:`operand_key` builds that part), the
number of CPU threads and the torch version. It lives in the process (:data:`STORE`) and, when
the environment variable ``GHLC_KERNEL_CACHE`` names a folder, in one JSON file there per
machine (the CPU's model name, or the CUDA device's name), written atomically; a damaged or
unreadable file gets one warning and is ignored. Nothing is measured, and the static choice
(``policy.py``'s thresholds) is used, when ``GHLC_MEASURE=0`` (or ``policy.override(
measure=False)``), for a single candidate, and inside ``torch.compile``'s tracing; while a CUDA
graph is being captured, a choice already measured is used and nothing new is timed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ghlc.errors import GHLError

from . import policy

CACHE_ENV = "GHLC_KERNEL_CACHE"
_FORMAT = 1


class Timer(Protocol):
    """A clock in seconds (``time.perf_counter`` by default; tests pass a fake one)."""

    def __call__(self) -> float: ...


@dataclass(frozen=True)
class MeasureStats:
    """What measuring cost this process so far (for benchmarks: the first step's overhead)."""

    seconds: float = 0.0  # time spent timing candidates (warm-up calls included)
    measured: int = 0  # choices made by timing
    hits: int = 0  # choices found in the process's cache
    disk_hits: int = 0  # choices found in the on-disk cache
    choices: dict[str, str] = field(default_factory=dict)  # full key (JSON) -> candidate


class KernelStore:
    """The process's measured choices, statistics and warnings given: state, not tuning."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.choices: dict[tuple, str] = {}  # (op, key, threads) -> candidate
        self.by_key: dict[str, str] = {}  # the same, by full key as written to disk
        self.disk: dict[str, dict[str, str]] = {}  # cache file -> its choices, read once
        self.warned: set[str] = set()
        self.seconds = 0.0
        self.measured = 0
        self.hits = 0
        self.disk_hits = 0


STORE = KernelStore()


def stats() -> MeasureStats:
    """A snapshot of the process's measuring statistics."""
    s = STORE
    return MeasureStats(s.seconds, s.measured, s.hits, s.disk_hits, dict(s.by_key))


def reset() -> None:
    """Forget every choice made in this process and zero the statistics (not the disk cache)."""
    STORE.reset()


def memory_format(t: torch.Tensor) -> str:
    """The memory format of ``t``: contiguous, channels_last(_3d), or its dims in memory order."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "strides" + str(tuple(t.stride()))


def operand_key(*tensors: torch.Tensor) -> tuple:
    """The part of a key that the operands decide: the device of the first, and each one's
    dtype, shape and memory format."""
    if not tensors:
        raise ValueError("operand_key needs at least one tensor")
    return (tensors[0].device,) + tuple((t.dtype, t.shape, memory_format(t)) for t in tensors)


def choose(
    op: str,
    key: tuple,
    candidates: Mapping[str, Callable[[], object]],
    static: str,
    *,
    timer: Timer | None = None,
) -> str:
    """The name of the fastest of ``candidates`` (calls computing the same numbers) for
    ``(op, key)``, measured once per process and key; ``static`` where nothing is measured.
    ``key`` is a hashable tuple of what decides the speed (:func:`operand_key` of the operands,
    the call's geometry); its first ``torch.device`` says where to synchronise (CPU if none)."""
    if static not in candidates:
        raise ValueError(
            f"{op}: static choice {static!r} is not among the candidates "
            f"{', '.join(candidates) or '(none)'}"
        )
    if len(candidates) == 1 or not policy.current().measure or torch.compiler.is_compiling():
        return static
    mem = (op, key, torch.get_num_threads())  # the torch version is the process's own
    hit = STORE.choices.get(mem)
    if hit is not None and hit in candidates:
        STORE.hits += 1
        return hit
    if _stream_capturing():
        return static  # timing now would record the candidates into the graph
    full = _full_key(op, key, mem[2])
    device = _device_of(key)
    folder = os.environ.get(CACHE_ENV) or None
    path = _cache_path(folder, device) if folder else None
    if path is not None:
        hit = _read_disk(path).get(full)
        if hit is not None and hit in candidates:
            _record(mem, full, hit)
            STORE.disk_hits += 1
            return hit
    clock: Timer = timer or time.perf_counter
    start = clock()
    times = time_candidates(
        candidates, policy.current().measure_repeats, device, clock, keep=static
    )
    STORE.seconds += clock() - start
    STORE.measured += 1
    best = fastest(times, static)
    _record(mem, full, best)
    if path is not None:
        _write_disk(path, device, full, best)
    return best


def time_candidates(
    candidates: Mapping[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    timer: Timer,
    *,
    keep: str | None = None,
) -> dict[str, float]:
    """Median seconds of ``repeats`` timed calls of each candidate, after one warm-up call
    each; the candidates take turns, so that a slow drift of the machine affects all alike.
    A candidate other than ``keep`` whose warm-up call raises a RuntimeError (say, out of
    memory for its temporaries) is left out."""
    if repeats < 1:
        raise ValueError(f"measure_repeats={repeats}: expected at least 1")
    sync = _synchroniser(device)
    runs: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                fn()
                sync()
            except RuntimeError:
                if name == keep:
                    raise
                continue
            runs[name] = []
        if not runs:
            raise RuntimeError("every kernel candidate failed: " + ", ".join(candidates))
        for _ in range(repeats):
            for name in runs:
                fn = candidates[name]
                t0 = timer()
                fn()
                sync()
                runs[name].append(timer() - t0)
    return {name: statistics.median(r) for name, r in runs.items()}


def fastest(times: Mapping[str, float], static: str) -> str:
    """The candidate with the smallest time; ``static`` where it ties with the best."""
    best = min(times.values())
    if times.get(static) == best:
        return static
    return next(name for name, t in times.items() if t == best)


def _record(mem: tuple, full: str, choice: str) -> None:
    STORE.choices[mem] = choice
    STORE.by_key[full] = choice


def _device_of(key: tuple) -> torch.device:
    """The first torch.device in ``key`` (searched depth first); CPU where there is none."""
    stack = [key]
    while stack:
        k = stack.pop()
        if isinstance(k, torch.device):
            return k
        if isinstance(k, tuple | list):
            stack.extend(reversed(k))
    return torch.device("cpu")


def _synchroniser(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _stream_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _plain(v: object) -> object:
    """``v`` as JSON data: tuples as lists, torch objects (device, dtype, format) as strings."""
    if isinstance(v, tuple | list):
        return [_plain(i) for i in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _full_key(op: str, key: tuple, threads: int) -> str:
    """The key as it is written to disk (JSON), with the torch version added."""
    return json.dumps([op, _plain(key), threads, torch.__version__], separators=(",", ":"))


def _cpuinfo(field: str) -> str:
    """The first ``field`` of /proc/cpuinfo ('' where there is none, as off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_name(device: torch.device) -> str:
    """The name of the processor that runs kernels on ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown cpu"


def _cache_path(folder: str, device: torch.device) -> str:
    """The cache file of this machine: its name, and a digest that also covers the CPU's
    instruction-set flags (a virtual machine's model name may not tell AVX2 from AVX-512)."""
    name = machine_name(device)
    flags = _cpuinfo("flags") if device.type == "cpu" else ""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:60] or "machine"
    digest = hashlib.sha1(f"{device.type}:{name}:{flags}".encode()).hexdigest()[:8]
    return os.path.join(folder, f"{device.type}-{slug}-{digest}.json")


def _warn_once(tag: str, message: str) -> None:
    if tag not in STORE.warned:
        STORE.warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _load(path: str) -> dict[str, str]:
    """The choices in the cache file ``path``; {} with a warning where it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return {}  # nothing cached yet (a folder that cannot exist warns when written)
    except (OSError, ValueError) as e:
        _warn_once(path, f"kernel cache {path} ignored: cannot read it ({e})")
        return {}
    choices = data.get("choices") if isinstance(data, dict) else None
    if (
        not isinstance(choices, dict)
        or data.get("format") != _FORMAT
        or not all(isinstance(v, str) for v in choices.values())
    ):
        _warn_once(
            path, f"kernel cache {path} ignored: not a ghlc kernel cache of format {_FORMAT}"
        )
        return {}
    return choices


def _read_disk(path: str) -> dict[str, str]:
    if path not in STORE.disk:
        STORE.disk[path] = _load(path)
    return STORE.disk[path]


def _write_disk(path: str, device: torch.device, full: str, choice: str) -> None:
    """Add one choice to the cache file, merged with what other processes wrote meanwhile,
    atomically (a reader never sees half a file); a failure warns once and is not fatal."""
    choices = {**_read_disk(path), **_load(path), full: choice}
    STORE.disk[path] = choices
    data = {"format": _FORMAT, "machine": machine_name(device), "choices": choices}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, json.dumps(data, indent=0, sort_keys=True))
    except (OSError, GHLError) as e:
        _warn_once("write:" + path, f"kernel cache not written: {e}")


def _write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename it into place: a reader
    never sees half a file. (The runtime imports nothing from ghlc but the IR and errors.)"""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
