"""genrec.ops.native: the build cache's key, atomic builds, the struct layout check, and the fallback to the PyTorch
implementations (same results) when the kernels are off or cannot be built."""

from __future__ import annotations

import ctypes
import logging
import threading

import pytest
import torch

from genrec.ops import native as native_mod
from genrec.ops.dropout import dropout
from genrec.ops.hstu_attention import blocked_hstu_attention
from tests.ops import max_diff


@pytest.fixture
def fresh_state(monkeypatch):
    """``load()`` decides again within the test; the process's loaded library is restored afterwards."""
    monkeypatch.setattr(native_mod, "_STATE", {})


def _compiler_or_skip() -> list[str]:
    cmd, why = native_mod.compiler_command()
    if cmd is None:
        pytest.skip(f"no C compiler here: {why}")
    return cmd


def test_cache_key_covers_source_compiler_flags_and_cpu():
    base = native_mod.cache_key(b"int f(void) { return 1; }", "gcc 12", ["-O3"], "cpu A")
    assert base == native_mod.cache_key(b"int f(void) { return 1; }", "gcc 12", ["-O3"], "cpu A")
    assert base != native_mod.cache_key(b"int f(void) { return 2; }", "gcc 12", ["-O3"], "cpu A")
    assert base != native_mod.cache_key(b"int f(void) { return 1; }", "gcc 13", ["-O3"], "cpu A")
    assert base != native_mod.cache_key(b"int f(void) { return 1; }", "gcc 12", ["-O2"], "cpu A")
    assert base != native_mod.cache_key(b"int f(void) { return 1; }", "gcc 12", ["-O3"], "cpu B")
    # parts are length-prefixed: moving a character from one part to the next changes the key
    assert native_mod.cache_key(b"ab", "c", [], "") != native_mod.cache_key(b"a", "bc", [], "")


def test_changed_source_builds_a_new_library(tmp_path):
    cmd = _compiler_or_skip()
    src = tmp_path / "kernel.c"
    src.write_text("int genrec_probe(void) { return 1; }\n")
    first = native_mod.build(cmd, native_mod.BASE_FLAGS, src, tmp_path / "cache")
    assert native_mod.build(cmd, native_mod.BASE_FLAGS, src, tmp_path / "cache") == first  # cached
    src.write_text("int genrec_probe(void) { return 2; }\n")
    second = native_mod.build(cmd, native_mod.BASE_FLAGS, src, tmp_path / "cache")
    assert second != first
    assert ctypes.CDLL(str(first)).genrec_probe() == 1 and ctypes.CDLL(str(second)).genrec_probe() == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, second.name])  # no leftovers


def test_concurrent_builds_leave_one_whole_library(tmp_path):
    cmd = _compiler_or_skip()
    paths, errors = [], []

    def run():
        try:
            paths.append(native_mod.build(cmd, native_mod.FLAG_SETS[-1], directory=tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temporary files left behind
    native_mod.check_layout(ctypes.CDLL(str(paths[0])))  # the file is complete and matches the structs


def test_cache_dir_honours_genrec_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert native_mod.cache_dir() == tmp_path / "g" / "native"
    monkeypatch.delenv("GENREC_CACHE_DIR")
    assert native_mod.cache_dir() == tmp_path / "x" / "genrec" / "native"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert native_mod.cache_dir().parts[-3:] == (".cache", "genrec", "native")


def test_struct_layout_mismatch_is_refused(monkeypatch):
    lib = native_mod.load()
    if lib is None:
        pytest.skip("the native kernels could not be built here: see the genrec.native log")
    cdll = ctypes.CDLL(str(lib.path))
    native_mod.check_layout(cdll)  # the real mirrors match

    class Swapped(ctypes.Structure):  # two fields in the other order: same size, different offsets
        _fields_ = [("y", ctypes.c_void_p), ("x", ctypes.c_void_p), *native_mod.DropoutArgs._fields_[2:]]

    structs = list(native_mod.STRUCTS)
    structs[structs.index(native_mod.DropoutArgs)] = Swapped
    monkeypatch.setattr(native_mod, "STRUCTS", tuple(structs))
    with pytest.raises(RuntimeError, match="Swapped"):
        native_mod.check_layout(cdll)
    monkeypatch.setattr(native_mod, "ABI_VERSION", native_mod.ABI_VERSION + 1)
    with pytest.raises(RuntimeError, match="ABI version"):
        native_mod.check_layout(cdll)


def test_isa_setting_picks_the_march_flag_and_refuses_unknown_values(fresh_state, monkeypatch, caplog):
    assert native_mod.flag_sets("native") == native_mod.FLAG_SETS
    avx2 = native_mod.flag_sets("avx2")
    assert [f for flags in avx2 for f in flags if f.startswith("-march")] == ["-march=x86-64-v3"] * 2
    assert avx2[-1] == native_mod.BASE_FLAGS  # the last resort compiles for no particular CPU either way
    monkeypatch.delenv("GENREC_NATIVE_ISA", raising=False)
    assert native_mod.native_isa() == "native"
    monkeypatch.setenv("GENREC_NATIVE_ISA", "AVX2")
    assert native_mod.native_isa() == "avx2"
    monkeypatch.setenv("GENREC_NATIVE_ISA", "avx1024")
    with pytest.raises(ValueError, match="avx1024"):
        native_mod.native_isa()
    with caplog.at_level(logging.WARNING, logger="genrec.native"):
        assert native_mod.load() is None
    assert "GENREC_NATIVE_ISA" in caplog.text


def test_avx2_build_gives_the_reference_results(monkeypatch, tmp_path):
    """The AVX2 vector rows of the tile loop (what an AVX2-only CPU runs) against the PyTorch passes."""
    from genrec.runtime import cpu_flags

    cmd = _compiler_or_skip()
    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run AVX2 + FMA code")
    flags = native_mod.flag_sets("avx2")[1]  # without OpenMP: one build for this test, in its own directory
    path = native_mod.build(cmd, flags, directory=tmp_path)
    kernels = native_mod.Kernels(ctypes.CDLL(str(path)), path, tuple(flags))
    if not kernels.has_sgemm:
        pytest.skip("no exported BLAS sgemm in this torch build: the C tile loop does not run")
    reference = _attention_and_grads(native=False)
    monkeypatch.setattr(native_mod, "_STATE", {"lib": kernels})
    for a, b in zip(_attention_and_grads(native=True), reference):
        assert max_diff(a, b) <= 1e-5


@pytest.mark.parametrize("value", ["0", "off", "false", "No"])
def test_environment_switch(fresh_state, monkeypatch, value):
    monkeypatch.setenv("GENREC_NATIVE", value)
    assert native_mod.load() is None


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    B, h, N, d = 2, 2, 40, 8
    q, k, v = ((torch.randn(B, h, N, d, generator=g) * 0.5).requires_grad_() for _ in range(3))
    ts = torch.cumsum(torch.randint(0, 10_000, (B, N + 1), generator=g), 1)
    pos_w = (torch.randn(N, generator=g) * 0.5).requires_grad_()
    ts_w = (torch.randn(33, generator=g) * 0.5).requires_grad_()
    return q, k, v, pos_w, ts_w, ts[:, :-1], ts[:, 1:], torch.tensor([True, False])


def _attention_and_grads(native=None):
    q, k, v, pos_w, ts_w, t, qt, has_time = _attention_inputs()
    out = blocked_hstu_attention(q, k, v, pos_w, ts_w, t, qt, has_time, 32, torch.tensor([40.0]),
                                 lengths=torch.tensor([40, 23]), block=16, native=native)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach(), q.grad, k.grad, v.grad, pos_w.grad, ts_w.grad]


def test_missing_compiler_falls_back_with_one_warning_and_the_same_results(fresh_state, monkeypatch, tmp_path,
                                                                           caplog):
    with_kernels = native_mod._load()  # the kernels where this machine builds them (None if it cannot)
    monkeypatch.setattr(native_mod, "_STATE", {"lib": with_kernels})
    x = torch.randn(64, 33)
    torch.manual_seed(4)
    ref_drop = dropout(x, 0.3, training=True)
    ref_attn = _attention_and_grads()

    monkeypatch.setattr(native_mod, "_STATE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GENREC_NATIVE", raising=False)
    with caplog.at_level(logging.WARNING, logger="genrec.native"):
        assert native_mod.load() is None
        assert native_mod.load() is None
    warnings = [r for r in caplog.records if r.name == "genrec.native"]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0].getMessage()
    assert "PyTorch implementations" in warnings[0].getMessage()
    assert not (tmp_path / "empty-cache").exists()

    torch.manual_seed(4)
    assert torch.equal(dropout(x, 0.3, training=True), ref_drop)  # bit for bit
    for a, b in zip(_attention_and_grads(), ref_attn):
        assert max_diff(a, b) <= 1e-5  # same math, another summation order


def test_failed_build_falls_back(fresh_state, monkeypatch, tmp_path, caplog):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc 1.0'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GENREC_NATIVE", raising=False)
    with caplog.at_level(logging.WARNING, logger="genrec.native"):
        assert native_mod.load() is None
    assert "could not build" in caplog.text
    assert not any(p.suffix == ".so" for p in (tmp_path / "cache" / "native").iterdir())
