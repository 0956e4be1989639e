"""Process-wide runtime settings, applied explicitly by the commands that own the process (never on import).

``keep_freed_memory`` — glibc's malloc returns large freed blocks to the kernel (anything over its mmap threshold
is its own ``mmap``; the top of the heap is trimmed past 128 KiB free), so every fresh activation tensor of a
forward pass costs page faults again: one per 4 KiB page, zero-filled by the kernel. A serving forward pass over
16 histories of 200 items (the ML-1M HSTU model, one thread, ``bench/serve_forward.py``) took ~4,900 minor page
faults and 1.40 ms per request on the padded path, 0.80 ms on the jagged one; with freed memory kept, ~180 faults
and 0.78 ms padded, none and 0.64 ms jagged. The cost is that the
process keeps its peak heap instead of shrinking after it: right for a server, which reaches its peak again at
every batch. ``genrec serve`` applies it (``create_app(keep_memory=True)``). Training gained nothing measurable (an
HSTU-large ML-1M epoch at two threads: 20.9 s with glibc's defaults, 22.5 and 23.4 s with memory kept; attention
and layer benchmarks at length 1024 within their noise), so ``genrec train`` leaves malloc alone.

``machine_info`` / ``cpu_flags`` — which machine a speed figure comes from: the CPU model, the instruction-set
extensions that decide kernel speed (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16`` ...), PyTorch's own CPU
dispatch level, the torch build and its BLAS. Every benchmark row records them.

``resolve_autocast`` — bf16 autocast only where it pays. On a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX)
bf16 matmuls run about 4x faster than fp32; on one without (AVX2 only) PyTorch emulates them and the same training
step runs 7-15x *slower*. A ``train.autocast=bfloat16`` run on such a CPU therefore runs in fp32, with one warning
saying so; CUDA devices use bf16 where the device supports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import re

import torch

log = logging.getLogger("genrec")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks up to 32 MiB come from the heap, which is kept
TRIM_THRESHOLD = 1 << 30  # give the heap's free top back to the kernel only past 1 GiB
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring). Returns whether it applied:
    False (and nothing changed) where the C library is not glibc (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and BSD libcs lack it (and its mallopt)
    except (OSError, AttributeError, TypeError):
        log.debug("not glibc: malloc settings left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(p, v) == 1 for p, v in
             ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))  # fmt: skip
    if not ok:
        log.warning("glibc mallopt refused a setting: freed memory may still go back to the kernel")
    return ok


# ------------------------------------------------------------------------------------------------- machine facts
# The instruction-set extensions that decide how fast genrec's CPU kernels and PyTorch's BLAS run, in the names
# Linux's /proc/cpuinfo uses (aarch64 says "bf16" for its bf16 dot products).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "bf16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags in lower case) from ``/proc/cpuinfo``; ("", empty) where it is not there."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:  # x86 / aarch64
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (lower case) from ``/proc/cpuinfo``; empty where the file is not there (not Linux)."""
    return _cpuinfo()[1]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown CPU"


def blas_name() -> str:
    """The BLAS this torch build calls for CPU matmuls (``BLAS_INFO`` of ``torch.__config__.show()``)."""
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


# Settings that make a machine run narrower code than it could: PyTorch's kernel dispatch level, MKL's instruction
# set, and what genrec's native kernels are compiled for (genrec.ops.native). ``bench/speed.py --isa avx2`` sets all
# three, so that an AVX-512 machine measures what an AVX2-only machine runs.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "GENREC_NATIVE_ISA")


def machine_info() -> dict:
    """What a speed figure depends on: ``{"cpu", "logical_cpus", "isa", "torch_cpu_capability", "torch", "blas",
    "isa_limits"}``. ``isa`` lists the extensions of ``ISA_FLAGS`` this CPU has (empty where the flags cannot be
    read); ``isa_limits`` the ``ISA_LIMITS`` variables set in the environment (the code then runs narrower than
    ``isa``)."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "blas": blas_name(),
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
    }


def machine_summary(info: dict | None = None) -> str:
    """One line for a table: ``"AMD EPYC, 2 logical CPUs, avx2+fma, torch 2.13.0+cpu, mkl"``, followed by
    ``", run as avx2 (ATEN_CPU_CAPABILITY=avx2 ...)"`` when ISA limits are set."""
    info = info or machine_info()
    isa = "+".join(info["isa"]) or "ISA unknown"
    line = f"{info['cpu']}, {info['logical_cpus']} logical CPUs, {isa}, torch {info['torch']}, {info['blas']}"
    limits = info.get("isa_limits") or {}
    if limits:
        line += (f", run as {str(info['torch_cpu_capability']).lower()} ("
                 + " ".join(f"{k}={v}" for k, v in limits.items()) + ")")
    return line


# ------------------------------------------------------------------------------------------------------- autocast
def native_bf16(device: torch.device | str, flags: frozenset[str] | None = None) -> bool:
    """Whether ``device`` computes in bf16 natively: a CPU with AVX-512 BF16, AMX-BF16 or aarch64 BF16 (``flags``:
    the CPU's flags, read from the machine when None); a CUDA device that supports bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS)


def resolve_autocast(requested: str, device: torch.device | str, flags: frozenset[str] | None = None) -> str:
    """The autocast a run uses: ``requested`` ("none" or "bfloat16"), except that bf16 on a device without native
    bf16 becomes "none" (fp32), with one warning naming the device and the reason."""
    if requested not in ("none", "bfloat16"):
        raise ValueError(f"autocast must be 'none' or 'bfloat16', got {requested!r}")
    if requested == "none" or native_bf16(device, flags):
        return requested
    device = torch.device(device)
    where = f"this CPU ({cpu_model()}) has no native bf16 (no avx512_bf16 / amx_bf16)" if device.type == "cpu" \
        else f"device {device} has no native bf16"
    log.warning("autocast=bfloat16 requested, but %s: bf16 would be emulated and run several times slower than "
                "fp32 there, so this run computes in fp32", where)  # fmt: skip
    return "none"
