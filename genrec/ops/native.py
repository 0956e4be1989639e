"""Build and load genrec's native CPU kernels (one C file, ``hstu_tiles.c``) with the system C compiler, via ctypes.

What the kernels do: the fused elementwise passes of the blocked HSTU attention, its whole fp32 tile loop, the
time-bucket ids of its tiles (``genrec.ops.hstu_attention``), and the counter-based dropout of
``genrec.ops.dropout``. Every one of them has a pure-PyTorch twin that runs when the library is not available, so
the kernels only ever change speed: the same seed and configuration give the same model with or without them (the
dropout masks bit for bit, the attention sums up to float rounding order).

How it is built. ``load()`` compiles ``hstu_tiles.c`` into a shared library once per

    (source hash, compiler command and its ``--version``, flags, CPU model and feature flags)

and keeps it in ``$GENREC_CACHE_DIR/native`` (else ``$XDG_CACHE_HOME/genrec/native``, else
``~/.cache/genrec/native``). The file is compiled to a temporary name in that directory and renamed into place, so
two processes building at once never load (or leave) a partial library; both may compile, one rename wins.
``-march=native`` is safe because the key includes this CPU's feature flags. It tries ``-fopenmp`` first (the
kernels then run on the OpenMP pool that PyTorch has already loaded, sized by ``torch.set_num_threads``), then
without OpenMP, then without ``-march=native``. ``GENREC_NATIVE_ISA=avx2`` compiles for ``-march=x86-64-v3``
(AVX2 + FMA, no AVX-512) instead of ``-march=native``: with ``ATEN_CPU_CAPABILITY=avx2`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` an AVX-512 machine then runs the code an AVX2-only machine runs
(``bench/speed.py --isa avx2`` sets all three).

Why ctypes and not ``torch.utils.cpp_extension``: the kernels need no ATen (they work on raw fp32 / bf16 / int64
buffers between the engine's ATen matmuls), so one C file compiles in about a second with the system ``cc``,
where an extension built against the torch headers takes on the order of a minute and needs a C++ toolchain and
ninja, which on a small CI machine is paid at every cold cache. ctypes releases the GIL during each call.

How it is called. Every kernel takes a pointer to one argument struct. The structs are declared once in C (as
field lists) and mirrored here as ``ctypes.Structure`` classes; at load, ``genrec_abi_version()`` and each struct's
size, field names and offsets (``genrec_struct_layout``) must equal this module's, or the library is not used.
Callers fill the structs by field name (``TileArgs(s=..., C=...)``) through ``Kernels``.

The fp32 tile loop multiplies with the BLAS ``sgemm_`` that PyTorch's CPU library exports (only in MKL builds of
torch, whose ``sgemm_`` takes 32-bit integers as the kernel calls it). Its address is handed to the library, which
checks it on a small product before using it (``Kernels.has_sgemm``); without it the engine keeps its ATen matmuls.

Switches and messages: ``GENREC_NATIVE=0`` (or ``false`` / ``off`` / ``no``) turns the kernels off; ``CC`` picks the
compiler (default: ``cc``, ``gcc`` or ``clang`` on the PATH). When the kernels are off or cannot be built,
``load()`` returns None and says why once, on the ``genrec.native`` logger (a warning for a missing compiler or a
failed build, info for ``GENREC_NATIVE=0``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from genrec.io import cache_dir as genrec_cache_dir

log = logging.getLogger("genrec.native")

SOURCE = Path(__file__).with_name("hstu_tiles.c")
ABI_VERSION = 2
BASE_FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
# Tried in order until one builds and loads.
FLAG_SETS = (
    [*BASE_FLAGS, "-march=native", "-fopenmp"],
    [*BASE_FLAGS, "-march=native"],
    BASE_FLAGS,
)
# GENREC_NATIVE_ISA: what the kernels are compiled for instead of this CPU ("native", the default)
ISA_MARCH = {"native": "-march=native", "avx2": "-march=x86-64-v3"}
DROPOUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # tensor dtypes the dropout kernel takes (its dtype code)
_OFF = {"0", "false", "off", "no"}
_STATE: dict[str, object] = {}
_LOCK = threading.Lock()

_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class TileArgs(ctypes.Structure):
    """``genrec_tile_args``: the elementwise passes of one chunk of tiles (see hstu_tiles.c)."""

    _fields_ = [("s", _p), ("dw", _p), ("pos", _p), ("bucket", _p), ("ts", _p), ("dpos", _p), ("dts", _p),
                ("C", _i64), ("dtype", _int), ("H", _int), ("B", _int), ("bucket_dtype", _int), ("nts", _int),
                ("diag", _int)]


class BucketArgs(ctypes.Structure):
    """``genrec_bucket_args``: the time-bucket ids of a list of tiles."""

    _fields_ = [("slot_qt", _p), ("slot_t", _p), ("timed", _p), ("qi", _p), ("ki", _p), ("out", _p), ("n", _i64),
                ("B", _int), ("nb", _int), ("out_dtype", _int)]


class DropoutArgs(ctypes.Structure):
    """``genrec_dropout_args``: counter-based dropout of n elements."""

    _fields_ = [("x", _p), ("y", _p), ("n", _i64), ("seed", ctypes.c_uint64), ("p", ctypes.c_float),
                ("dtype", _int)]


class AttnArgs(ctypes.Structure):
    """``genrec_attn_args``: the whole fp32 tile loop, forward or backward."""

    _fields_ = [(name, _p) for name in ("q", "k", "v", "go", "norm", "pos", "ts", "out", "dq", "dk", "dv", "dpos",
                                        "dts", "qi", "ki", "delta", "bucket", "gstart", "qbase", "vbase")]
    _fields_ += [(name, _i64) for name in ("qhs", "qrs", "vhs", "vrs", "qnumel", "vnumel", "ngroups")]
    _fields_ += [(name, _int) for name in ("H", "B", "dim_qk", "dim_v", "P", "nts", "bucket_dtype", "panel")]


STRUCTS = (TileArgs, BucketArgs, DropoutArgs, AttnArgs)  # index = ``which`` of genrec_struct_layout


class Kernels:
    """The loaded library, one typed method per kernel. ``has_sgemm``: the fp32 tile loop can run here; ``flags``:
    the compiler flags it was built with."""

    def __init__(self, cdll: ctypes.CDLL, path: Path, flags: tuple[str, ...] = ()) -> None:
        self.path = path
        self.flags = tuple(flags)
        self._lib = cdll
        for name, struct, restype in (("genrec_tile_pass", TileArgs, None), ("genrec_dropout", DropoutArgs, None),
                                      ("genrec_time_buckets_tiles", BucketArgs, _int),
                                      ("genrec_attn_forward", AttnArgs, _int), ("genrec_attn_backward", AttnArgs, _int)):
            fn = getattr(cdll, name)
            fn.argtypes = [ctypes.POINTER(struct)]
            fn.restype = restype
        cdll.genrec_set_sgemm.argtypes = [_p]
        cdll.genrec_set_sgemm.restype = _int
        self.has_sgemm = self.set_sgemm(_blas_sgemm())

    def set_sgemm(self, address: int | None) -> bool:
        """Hand the library a BLAS ``sgemm_`` (an address, or None for none); it is kept only if it computes a small
        product right. Returns (and sets ``has_sgemm`` to) whether it was kept."""
        self.has_sgemm = bool(self._lib.genrec_set_sgemm(address))
        return self.has_sgemm

    def tile_pass(self, args: TileArgs) -> None:
        self._lib.genrec_tile_pass(ctypes.byref(args))

    def time_buckets(self, args: BucketArgs) -> None:
        if self._lib.genrec_time_buckets_tiles(ctypes.byref(args)):
            raise MemoryError("the time-bucket kernel could not allocate its scratch buffers")

    def attn_forward(self, args: AttnArgs) -> None:
        if self._lib.genrec_attn_forward(ctypes.byref(args)):
            raise MemoryError("the C attention loop could not allocate its per-thread buffers")

    def attn_backward(self, args: AttnArgs) -> None:
        if self._lib.genrec_attn_backward(ctypes.byref(args)):
            raise MemoryError("the C attention loop could not allocate its per-thread buffers")

    def dropout(self, x: torch.Tensor, out: torch.Tensor, p: float, seed: int) -> None:
        """out = dropout(x) (both contiguous, same shape, CPU, fp32 or bf16)."""
        args = DropoutArgs(x=x.data_ptr(), y=out.data_ptr(), n=x.numel(), seed=seed, p=p, dtype=DROPOUT_DTYPES[x.dtype])
        self._lib.genrec_dropout(ctypes.byref(args))


# --------------------------------------------------------------------------------------------------- build, cache


def cache_dir() -> Path:
    """Where built libraries are kept: ``$GENREC_CACHE_DIR/native``, else ``$XDG_CACHE_HOME/genrec/native``, else
    ``~/.cache/genrec/native``."""
    return genrec_cache_dir() / "native"


def cpu_id() -> str:
    """This CPU's model name and feature flags (what ``-march=native`` compiles for)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model", "CPU part") and not model:
                model = line
            elif key in ("flags", "Features") and not flags:
                flags = line
    except OSError:
        pass
    return "\n".join((platform.machine(), platform.processor(), model, flags))


def compiler_command() -> tuple[list[str] | None, str]:
    """The compiler to use (``$CC``, which may carry words such as ``ccache gcc``; else cc / gcc / clang on the
    PATH) and, when there is none, why."""
    cc = os.environ.get("CC")
    if cc:
        cmd = shlex.split(cc)
        if cmd and shutil.which(cmd[0]):
            return cmd, ""
        return None, f"CC={cc!r} is not an executable on the PATH"
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name], ""
    return None, "no C compiler (cc, gcc or clang) on the PATH; set CC to use another"


def compiler_id(cmd: list[str]) -> str:
    """The compiler's resolved path and its ``--version`` output (part of the cache key)."""
    res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return f"{shutil.which(cmd[0])}\n{' '.join(cmd)}\n{res.stdout}{res.stderr}"


def cache_key(source: bytes, compiler: str, flags: list[str], cpu: str) -> str:
    """16 hex digits of sha256 over everything that decides the built library's content."""
    h = hashlib.sha256()
    for part in (source, compiler.encode(), "\0".join(flags).encode(), cpu.encode(), str(ABI_VERSION).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def build(cmd: list[str], flags: list[str], source: Path = SOURCE, directory: Path | None = None) -> Path:
    """The library for (source, compiler, flags, this CPU), compiled into ``directory`` (default ``cache_dir()``)
    unless it is already there. RuntimeError with the compiler's message when it fails."""
    directory = cache_dir() if directory is None else directory
    key = cache_key(source.read_bytes(), compiler_id(cmd), flags, cpu_id())
    out = directory / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-{key}-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        res = subprocess.run([*cmd, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=600,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} {' '.join(flags)} failed ({res.returncode}): "
                               f"{res.stderr.strip()[:2000]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: other processes see no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_layout(cdll: ctypes.CDLL) -> None:
    """RuntimeError unless the library's ABI version and every argument struct's size, field names and offsets
    equal this module's ctypes mirrors."""
    cdll.genrec_abi_version.restype = _int
    version = cdll.genrec_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(f"library ABI version {version}, this module expects {ABI_VERSION}")
    fn = cdll.genrec_struct_layout
    fn.argtypes = [_int, ctypes.POINTER(_i64), _int, ctypes.POINTER(ctypes.c_char_p)]
    fn.restype = _int
    for which, struct in enumerate(STRUCTS):
        out, names = (_i64 * 128)(), ctypes.c_char_p()
        count = fn(which, out, 128, ctypes.byref(names))
        theirs = (names.value or b"").decode().split()
        ours = [f[0] for f in struct._fields_]
        offsets = [out[1 + i] for i in range(count)]
        if theirs != ours or offsets != [getattr(struct, n).offset for n in ours] or out[0] != ctypes.sizeof(struct):
            raise RuntimeError(f"argument struct {struct.__name__} differs between hstu_tiles.c ({theirs}, offsets "
                               f"{offsets}, size {out[0]}) and genrec.ops.native ({ours})")


def _blas_sgemm() -> int | None:
    """Address of the BLAS ``sgemm_`` that PyTorch's own CPU library exports, or None. Only where torch is built
    with MKL, whose ``sgemm_`` has 32-bit integer arguments (LP64), as the kernel calls it; the library then checks
    it on a small product (``genrec_set_sgemm``) before the tile loop may use it."""
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


def native_isa() -> str:
    """``$GENREC_NATIVE_ISA`` (default "native"); ValueError for a value that is not a key of ``ISA_MARCH``."""
    isa = os.environ.get("GENREC_NATIVE_ISA", "native").strip().lower() or "native"
    if isa not in ISA_MARCH:
        raise ValueError(f"GENREC_NATIVE_ISA={isa!r}: expected one of {sorted(ISA_MARCH)}")
    return isa


def flag_sets(isa: str = "native") -> tuple[list[str], ...]:
    """The flag sets tried in order (``FLAG_SETS`` with ``-march=native`` replaced by the ISA's ``-march``)."""
    march = ISA_MARCH[isa]
    return tuple([march if f == "-march=native" else f for f in flags] for flags in FLAG_SETS)


def enabled_by_env() -> bool:
    return os.environ.get("GENREC_NATIVE", "1").strip().lower() not in _OFF


def _load() -> Kernels | None:
    if not enabled_by_env():
        log.info("GENREC_NATIVE=%s: genrec's native kernels are off; using their PyTorch implementations",
                 os.environ.get("GENREC_NATIVE"))
        return None
    cmd, why = compiler_command()
    if cmd is None:
        log.warning("genrec's native CPU kernels are unavailable (%s): using their PyTorch implementations (same "
                    "results, slower). GENREC_NATIVE=0 turns them off without this message.", why)
        return None
    try:
        isa = native_isa()
    except ValueError as e:
        log.warning("genrec's native CPU kernels are unavailable (%s): using their PyTorch implementations", e)
        return None
    errors = []
    for flags in flag_sets(isa):
        try:
            path = build(cmd, flags)
            cdll = ctypes.CDLL(str(path))
            check_layout(cdll)
            return Kernels(cdll, path, tuple(flags))
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            errors.append(f"[{' '.join(flags)}] {e}")
    log.warning("could not build genrec's native CPU kernels with %s: using their PyTorch implementations (same "
                "results, slower). GENREC_NATIVE=0 turns them off without this message. %s", " ".join(cmd),
                " / ".join(errors))
    return None


def load() -> Kernels | None:
    """The kernels, or None when they are turned off or cannot be built here (the reason is logged once)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"] = _load()
    return _STATE["lib"]  # type: ignore[return-value]


@contextlib.contextmanager
def disabled():
    """Within the block, ``load()`` returns None (everything runs its PyTorch implementation): for side-by-side
    benchmarks and tests. Not thread-safe; the previous state is restored on exit."""
    saved = dict(_STATE)
    _STATE["lib"] = None
    try:
        yield
    finally:
        _STATE.clear()
        _STATE.update(saved)
