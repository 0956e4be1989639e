"""Build and load genrec's native kernels (one C file, ``hstu_tiles.c``: the fused elementwise passes of the blocked
HSTU attention, its whole fp32 tile loop, the time-bucket ids of its tiles, and the counter-based dropout of
``genrec.ops.dropout``) with the system C compiler, through ``ctypes``.

The fp32 tile loop multiplies with the BLAS ``sgemm_`` that PyTorch's CPU library exports (MKL in the x86 wheels):
its address is looked up in ``libtorch_cpu`` and handed to the library (``lib.has_sgemm``). Where torch exports
none, the loop is off and the engine keeps its ATen matmuls.

Why not ``torch.utils.cpp_extension``: the kernel needs no ATen (it works on raw fp32 / bf16 buffers between the
engine's ATen matmuls), so a plain C file builds in about a second with ``cc`` instead of ~a minute against the
torch headers, and needs no ninja. ctypes releases the GIL during the call.

It is built with ``-fopenmp`` when the compiler supports it: torch ships its OpenMP runtime as ``libgomp.so.1``,
already loaded when the kernel loads, so the kernel's parallel loops run on torch's own thread pool (sized by
``torch.set_num_threads``) rather than a second pool competing for the cores. Without OpenMP it builds serial.

The library is built once per (source, compiler, flags, CPU flags) into ``$GENREC_CACHE_DIR/native`` (default
``~/.cache/genrec/native``), written to a temporary name and renamed, so concurrent processes never load a partial
file. ``-march=native`` is safe because the cache key includes this CPU's feature flags.

``GENREC_NATIVE=0`` turns the kernels off (the engine then runs its pure-PyTorch passes and bucket ids, the
reference, and dropout is ``F.dropout``). When no
compiler is found or the build fails, ``load()`` logs why once and returns None, and the engine falls back the
same way: the kernel only ever changes speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("genrec.native")

SOURCE = Path(__file__).with_name("hstu_tiles.c")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
_STATE: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("GENREC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "genrec")
    return Path(root) / "native"


def _build(compiler: str, flags: list[str]) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = _cache_dir() / f"hstu_tiles-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hstu_tiles-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({res.returncode}): {res.stderr.strip()[:2000]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hstu_tiles_forward.argtypes = [p, i32, i64, i32, i32, p, p, i32, p, i32]
    lib.hstu_tiles_forward.restype = None
    lib.hstu_tiles_backward.argtypes = [p, p, i32, i64, i32, i32, p, p, i32, p, i32, i32, p, p]
    lib.hstu_tiles_backward.restype = None
    lib.genrec_dropout.argtypes = [p, p, i64, i32, ctypes.c_float, ctypes.c_uint64]
    lib.genrec_dropout.restype = None
    lib.genrec_time_buckets_tiles.argtypes = [p, p, p, p, p, i64, i32, i32, p, i32]
    lib.genrec_time_buckets_tiles.restype = i32
    lib.genrec_set_sgemm.argtypes = [p]
    lib.genrec_set_sgemm.restype = i32
    rows = [p, p, i64, i64, i64, i64, i64, i64]  # qbase, vbase, qhs, qrs, vhs, vrs, qnumel, vnumel
    tiles = [i32, i32, i32, i32, p, p, p, p, i64, p, i32, p, i32, p]  # H, B, dk, dv, qi, ki, delta, gstart, ...
    lib.genrec_attn_forward.argtypes = [p, p, p, p, p, *rows, *tiles, i32]
    lib.genrec_attn_forward.restype = i32
    lib.genrec_attn_backward.argtypes = [p, p, p, p, p, p, p, p, *rows, *tiles, i32, i32, p, p]
    lib.genrec_attn_backward.restype = i32
    lib.has_sgemm = bool(lib.genrec_set_sgemm(_blas_sgemm()))
    return lib


def _blas_sgemm() -> int | None:
    """Address of the BLAS ``sgemm_`` that PyTorch's own CPU library exports, or None. Only where torch is built
    with MKL, whose ``sgemm_`` has 32-bit integer arguments (LP64), as the kernel calls it; the library then checks
    it on a small product (``genrec_set_sgemm``). The whole-loop attention kernels call it; without it the engine
    keeps its ATen matmuls."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    libdir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if not (libdir / name).exists():
            continue
        try:
            fn = ctypes.CDLL(str(libdir / name)).sgemm_
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def load() -> ctypes.CDLL | None:
    """The kernel library, or None when it is turned off or cannot be built here (the reason is logged once)."""
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    lib = None
    if os.environ.get("GENREC_NATIVE", "1") == "0":
        log.info("GENREC_NATIVE=0: blocked HSTU attention uses its pure-PyTorch elementwise passes")
    else:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            log.warning("no C compiler (cc / gcc / clang) found: blocked HSTU attention uses its pure-PyTorch passes")
        else:
            errors = []
            # With OpenMP first (the kernel then uses torch's threads), else serial.
            for flags in (FLAGS + ["-fopenmp"], FLAGS):
                try:
                    lib = _bind(ctypes.CDLL(str(_build(compiler, flags))))
                    break
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    errors.append(str(e))
            if lib is None:
                log.warning("could not build the native HSTU kernel (%s): using the pure-PyTorch passes",
                            " / ".join(errors))
    _STATE["lib"] = lib
    return lib


@contextlib.contextmanager
def disabled():
    """Within the block, ``load()`` returns None (the engine runs its pure-PyTorch passes): for side-by-side
    benchmarks of whole trainings. Not thread-safe; the previous state is restored on exit."""
    saved = dict(_STATE)
    _STATE["lib"] = None
    try:
        yield
    finally:
        _STATE.clear()
        _STATE.update(saved)
