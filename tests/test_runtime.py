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


# ------------------------------------------------------------------------------------ machine facts, bf16 dispatch
AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_vnni", "avx512_bf16"}
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.mark.parametrize(("flags", "native"), [
    (AVX2, False), (AVX2 | {"avx512f"}, False), (AVX512_BF16, True), (AMX, True), (frozenset({"asimd", "bf16"}), True),
    (frozenset(), False),
])  # fmt: skip
def test_native_bf16_needs_avx512_bf16_or_amx(flags, native):
    from genrec.runtime import native_bf16

    assert native_bf16("cpu", flags) is native


def test_bf16_on_a_cpu_without_native_bf16_runs_in_fp32_with_one_warning(caplog):
    from genrec.runtime import resolve_autocast

    with caplog.at_level("WARNING", logger="genrec"):
        assert resolve_autocast("bfloat16", "cpu", AVX2) == "none"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "fp32" in warnings[0].getMessage() and "bf16" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="genrec"):
        assert resolve_autocast("bfloat16", "cpu", AVX512_BF16) == "bfloat16"
        assert resolve_autocast("none", "cpu", AVX2) == "none"
        assert resolve_autocast("none", "cpu", AVX512_BF16) == "none"
    assert not caplog.records
    with pytest.raises(ValueError, match="autocast"):
        resolve_autocast("float16", "cpu", AVX2)


def test_machine_info_names_the_cpu_isa_torch_and_blas():
    import torch

    from genrec.runtime import ISA_FLAGS, cpu_flags, machine_info, machine_summary

    info = machine_info()
    assert set(info) == {"cpu", "logical_cpus", "isa", "torch_cpu_capability", "torch", "blas", "isa_limits"}
    assert info["torch"] == torch.__version__ and info["cpu"] and info["blas"]
    assert set(info["isa"]) <= set(ISA_FLAGS) and set(info["isa"]) == set(ISA_FLAGS) & cpu_flags()
    line = machine_summary(info)
    assert info["cpu"] in line and info["torch"] in line
    assert machine_summary({**info, "isa": []}).count("ISA unknown") == 1


def test_isa_limits_are_recorded_and_named_in_the_summary(monkeypatch):
    from genrec.runtime import ISA_LIMITS, machine_info, machine_summary

    for name in ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    plain = machine_info()
    assert plain["isa_limits"] == {} and "run as" not in machine_summary(plain)
    monkeypatch.setenv("GENREC_NATIVE_ISA", "avx2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    limited = machine_info()
    assert limited["isa_limits"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "GENREC_NATIVE_ISA": "avx2"}
    line = machine_summary(limited)
    assert "run as" in line and "GENREC_NATIVE_ISA=avx2" in line and "MKL_ENABLE_INSTRUCTIONS=AVX2" in line
