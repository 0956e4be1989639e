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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

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
