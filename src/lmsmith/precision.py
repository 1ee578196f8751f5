"""Which float precision to compute in: ``precision: auto`` resolves here, once per process.

bf16 halves the weight traffic of a decode step where the hardware computes it natively (CUDA
GPUs with bf16 support; CPUs with AVX512-BF16 or AMX, Arm CPUs with BF16), but on a CPU without
it every bf16 matmul is emulated: ~50x slower than fp32 on an AVX2-only EPYC (docs/results.md).
So ``auto`` picks bf16 only where the device computes it at least as fast as fp32, and an
explicit ``bf16`` on a CPU without native support warns.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
Resolved = Literal["fp32", "bf16"]

# x86 cpuinfo flags of native bf16 arithmetic; Arm lists "bf16" among its Features
_X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_capability() -> str:
    """torch's CPU kernel level (``DEFAULT``, ``AVX2``, ``AVX512``, ...; not bf16-specific)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16_flags(cpuinfo: str | None = None) -> bool | None:
    """True/False when /proc/cpuinfo says whether the CPU has native bf16; None when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags":  # x86
            return bool(_X86_BF16_FLAGS & set(value.split()))
        if key == "features":  # aarch64
            return "bf16" in value.split()
    return None


def bf16_matmul_ratio(n: int = 256, repeats: int = 3) -> float:
    """Time of a bf16 matmul over the same fp32 one on this CPU (best of ``repeats``)."""
    a = torch.randn(n, 2 * n)
    b = torch.randn(2 * n, 4 * n)

    def best(x, y) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    a16, b16 = a.bfloat16(), b.bfloat16()
    a @ b, a16 @ b16  # warm-up
    return best(a16, b16) / best(a, b)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Native bf16 on this CPU: the flags say no → no; otherwise a one-off micro-benchmark
    decides (bf16 at least as fast as fp32). Cached for the process."""
    if cpu_bf16_flags() is False:
        return False
    return bf16_matmul_ratio() <= 1.0


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively (and so at least as fast as fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device | str | None = None) -> Resolved:
    """``auto`` → bf16 where ``device`` has native bf16, else fp32; ``fp32``/``bf16`` stay,
    and an explicit ``bf16`` on a device without native support logs a warning.

    Args:
        precision: "auto", "fp32" or "bf16".
        device: where the computation runs (default: CUDA if available, else CPU).
    Returns: "fp32" or "bf16".
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    device = torch.device(device) if device is not None else default_device()
    if precision == "fp32":
        return "fp32"
    native = native_bf16(device)
    if precision == "bf16":
        if not native:
            _warn_slow_bf16(device.type)
        return "bf16"
    return "bf16" if native else "fp32"


@functools.cache
def _warn_slow_bf16(device_type: str) -> None:
    log.warning(
        "precision bf16 on a %s without native bf16 (capability %s): bf16 matmuls are emulated "
        "and can be ~50x slower than fp32; use --precision auto or fp32",
        device_type,
        cpu_capability() if device_type == "cpu" else "n/a",
    )


def torch_dtype(precision: Resolved) -> torch.dtype | None:
    """bf16 → torch.bfloat16; fp32 → None (compute in the weights' own fp32)."""
    return torch.bfloat16 if precision == "bf16" else None


def hardware(device: torch.device | str | None = None) -> dict:
    """What a result file records about the machine behind its precision choice."""
    device = torch.device(device) if device is not None else default_device()
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "cpu_capability": cpu_capability(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "bf16_native": native_bf16(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(requested: str, resolved: str, device: torch.device | str | None = None) -> str:
    """One line for the CLI: what was asked, what runs, and why."""
    device = torch.device(device) if device is not None else default_device()
    why = "native bf16" if native_bf16(device) else "no native bf16"
    where = f"{device.type}, {cpu_capability()}" if device.type == "cpu" else device.type
    asked = f" (asked {requested})" if requested != resolved else ""
    return f"precision: {resolved}{asked}; {where}, {why}"
