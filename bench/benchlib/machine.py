"""The machine a result was measured on: CPU model and vector flags, threads, torch, GPU."""

from __future__ import annotations

import os
import platform

import torch

from ghlc.train import _cpu_native_bf16

# /proc/cpuinfo flags that decide which CPU kernels run (oneDNN picks its kernels by them):
# machines sold under one name differ in them, and so do their fastest dispatch choices.
VECTOR_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512F",
    "avx512_bf16": "AVX-512 BF16",
    "amx_bf16": "AMX-BF16",
}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-instruction flags of :data:`VECTOR_FLAGS` this CPU has, by their names."""
    have = set(_cpuinfo().get("flags", "").split())
    return [name for flag, name in VECTOR_FLAGS.items() if flag in have]


def cpu_kernels() -> str:
    """The CPU's vector instruction set as torch's kernels use it, and whether oneDNN has
    native bfloat16 there (machines of one name differ: an AVX2-only "AMD EPYC" ran every
    step about twice as long as an earlier one, and has no fast bfloat16)."""
    parts = []
    try:
        parts.append(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        pass
    native = _cpu_native_bf16()
    if native is not None:
        parts.append("native bfloat16" if native else "no native bfloat16")
    return "; " + ", ".join(parts) if parts else ""


def machine(device: str) -> str:
    """One line naming the device a table was measured on."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    flags = cpu_flags()
    return (
        f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu_model()}{cpu_kernels()}"
        + (f"; flags {' '.join(flags)}" if flags else "")
        + f"), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def machine_info(device: str) -> dict:
    """The same as a record (for result files)."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        info["cpu_capability"] = None
    return info
