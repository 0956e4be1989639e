"""genrec.runtime: glibc malloc keeps freed memory, so re-allocating activations does not page-fault again."""

import subprocess
import sys
import textwrap

import pytest

# Three 8 MiB blocks alive together, touched, freed; six rounds. glibc's defaults hand the 24 MiB back to the kernel
# every round (the freed top exceeds its dynamic trim threshold), so every round faults ~6,100 pages again.
ROUNDS = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    from genrec.runtime import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(8 << 20) for _ in range(3)]
        for p in blocks:
            ctypes.memset(p, 1, 8 << 20)
        for p in blocks:
            libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)


def _rounds(mode: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_keep_freed_memory_stops_refaulting_freed_blocks():
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    default, kept = _rounds("default"), _rounds("keep")
    assert kept["applied"] is True
    assert min(default["faults"][1:]) > 3000  # the defaults: 24 MiB of fresh pages every round
    assert max(kept["faults"][1:]) < 100  # kept: the first round's pages are reused
