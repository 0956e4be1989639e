"""Blocked HSTU attention (genrec.ops.hstu_attention) against the plain reference path: values and gradients."""

import pytest
import torch

from genrec.models.hstu import HSTUConfig, HSTURelativeBias, hstu_attention, rab_index, time_buckets
from genrec.ops import native as native_mod
from genrec.ops.block_layout import BLOCK_SIZES, block_layout, choose_block
from genrec.ops.hstu_attention import blocked_hstu_attention
from tests.ops import max_diff

NB = 128  # time buckets


@pytest.fixture(params=["torch-passes", "native-kernel", "native-loop"])
def native(request):
    """The three ways of running the engine, as keyword arguments of ``blocked_hstu_attention``: elementwise passes
    in PyTorch (the reference) or in the C kernel between ATen matmuls, and the whole tile loop in C (fp32 only;
    bf16 inputs run the kernel between matmuls)."""
    if request.param != "torch-passes" and native_mod.load() is None:
        pytest.skip("the native HSTU kernel could not be built here (no C compiler?): see the genrec.native log")
    if request.param == "native-loop" and not native_mod.load().has_sgemm:
        pytest.skip("PyTorch's CPU library exports no BLAS sgemm here: the C tile loop is unavailable")
    return {"torch-passes": dict(native=False), "native-kernel": dict(native=True, loop=False),
            "native-loop": dict(native=True, loop=None)}[request.param]


def _inputs(B, h, N, dqk=8, dv=6, seed=0, max_len=None, lengths=None, has_time=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, h, N, dqk, generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, h, N, dv, generator=g).to(dtype).requires_grad_()
    ts = torch.cumsum(torch.randint(0, 100_000, (B, N + 1), generator=g), dim=1)
    torch.manual_seed(seed)
    bias = HSTURelativeBias(HSTUConfig(num_items=1, max_len=max_len or N, num_time_buckets=NB))
    with torch.no_grad():
        bias.pos_w.normal_(0, 0.5)
        bias.ts_w.normal_(0, 0.5)
    has_time = torch.ones(B, dtype=torch.bool) if has_time is None else torch.tensor(has_time)
    lengths = None if lengths is None else torch.tensor(lengths)
    return q, k, v, bias, ts[:, :-1], ts[:, 1:], has_time, lengths


def _plain(q, k, v, bias, t, qt, has_time, norm, use_pos=True, use_time=True):
    N = q.shape[2]
    pos = torch.arange(N)
    offsets = (pos.view(N, 1) - pos.view(1, N)).clamp(min=0)
    bias.use_position = use_pos
    index = rab_index(offsets, time_buckets(qt, t, NB), has_time, NB) if use_time else None
    return hstu_attention(q, k, v, bias(offsets, index), torch.ones(N, N).tril(), norm)


def _blocked(q, k, v, bias, t, qt, has_time, norm, use_pos=True, use_time=True, **kw):
    return blocked_hstu_attention(q, k, v, bias.pos_w if use_pos else None, bias.ts_w if use_time else None,
                                  t, qt, has_time, NB, norm, **kw)


def _grads(out, weight, tensors):
    return torch.autograd.grad((out * weight).sum(), tensors, allow_unused=True)


@pytest.mark.parametrize(
    "B, h, N, block, has_time, use_pos, use_time",
    [
        (2, 2, 37, 8, [True, False], True, True),  # N not a multiple of the block, a row without timestamps
        (1, 3, 64, 16, [True], True, True),  # exact multiple, one long row
        (3, 1, 20, 32, [True, True, False], True, True),  # a single block per row (diagonal tiles only)
        (2, 2, 33, 8, [True, True], False, True),  # time term only
        (2, 2, 33, 8, [True, True], True, False),  # position term only
        (2, 2, 33, 8, [False, False], True, True),  # no row has timestamps
        (2, 2, 300, 128, [True, False], True, True),  # blocks of 128: the C loop's diagonal tiles in panels
    ],
)
def test_blocked_equals_plain_values_and_gradients(B, h, N, block, has_time, use_pos, use_time, native):
    q, k, v, bias, t, qt, ht, _ = _inputs(B, h, N, has_time=has_time, max_len=N + 3)
    norm = torch.tensor([float(N + 3)])
    ref = _plain(q, k, v, bias, t, qt, ht, norm, use_pos, use_time)
    out = _blocked(q, k, v, bias, t, qt, ht, norm, use_pos, use_time, block=block, tile_elems=2 * block * block,
                   **native)
    assert max_diff(out, ref) <= 1e-5
    w = torch.randn_like(ref)
    params = [q, k, v, bias.pos_w, bias.ts_w]
    for name, a, b in zip("q k v pos_w ts_w".split(), _grads(ref, w, params), _grads(out, w, params)):
        if a is None or b is None:  # a term that is off gets no gradient (None) or a zero one
            assert (a is None or torch.count_nonzero(a) == 0) and (b is None or torch.count_nonzero(b) == 0), name
            continue
        assert max_diff(a, b) <= 1e-5, name


@pytest.mark.parametrize("N", [29, 32], ids=["padded-to-blocks", "multiple-of-block"])  # 32: the C loop in place
def test_row_lengths_skip_padding_and_per_row_norm(native, N):
    B, h = 3, 2
    q, k, v, bias, t, qt, ht, lengths = _inputs(B, h, N, lengths=[29, 9, 1], has_time=[True, False, True])
    norm = lengths.clamp(min=1).float()  # attention_norm="length"
    ref = _plain(q, k, v, bias, t, qt, ht, norm)
    out = _blocked(q, k, v, bias, t, qt, ht, norm, lengths=lengths, block=8, **native)
    valid = (torch.arange(N).view(1, N) < lengths.view(B, 1)).view(B, 1, N, 1)
    assert max_diff(out * valid, ref * valid) <= 1e-5
    assert torch.count_nonzero(out * ~valid) == 0  # padded queries are not computed
    w = torch.randn_like(ref) * valid  # the encoder discards padded rows
    for a, b in zip(_grads(ref, w, [q, bias.pos_w, bias.ts_w]), _grads(out, w, [q, bias.pos_w, bias.ts_w])):
        assert max_diff(a, b) <= 1e-5


def test_causal_tiles_are_skipped():
    # one sequence of 8 blocks: 8·9/2 = 36 tiles instead of 64; padded rows only pay for their own blocks
    assert block_layout(torch.tensor([1024]), 128, 4).num_tiles == 36
    lay = block_layout(torch.tensor([200, 10, 64]), 64, 1, torch.arange(3) * 4, 12)
    assert lay.num_tiles == 10 + 1 + 1


def test_block_size_choice():
    short, long = choose_block([100] * 128, 2, 25), choose_block([4096], 4, 64)
    assert short in BLOCK_SIZES and long in BLOCK_SIZES and short < long
    q, k, v, bias, t, qt, ht, lengths = _inputs(2, 2, 50, lengths=[50, 17])
    norm = torch.tensor([50.0])
    auto = _blocked(q, k, v, bias, t, qt, ht, norm, lengths=lengths)  # block=None: chosen from the lengths
    assert max_diff(auto, _blocked(q, k, v, bias, t, qt, ht, norm, lengths=lengths, block=8)) <= 1e-5


def test_bf16_close_to_fp32(native):
    B, h, N = 2, 2, 150
    q, k, v, bias, t, qt, ht, _ = _inputs(B, h, N, dqk=16, dv=16, has_time=[True, False])
    norm = torch.tensor([float(N)])
    ref = _plain(q, k, v, bias, t, qt, ht, norm)
    w = torch.randn_like(ref)
    ref_grads = _grads(ref, w, [q, k, v, bias.pos_w, bias.ts_w])
    q16, k16, v16 = (x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out = _blocked(q16, k16, v16, bias, t, qt, ht, norm, block=32, **native)
    assert out.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert max_diff(out.float(), ref) <= 0.03 * scale
    grads = _grads(out.float(), w, [q16, k16, v16, bias.pos_w, bias.ts_w])
    for name, a, b in zip("q k v pos_w ts_w".split(), ref_grads, grads):
        assert b.dtype == (torch.bfloat16 if name in "q k v" else torch.float32), name
        assert max_diff(b.float(), a) <= 0.05 * a.abs().max(), name


def test_autocast_computes_in_input_dtype():
    q, k, v, bias, t, qt, ht, _ = _inputs(1, 2, 40)
    norm = torch.tensor([40.0])
    ref = _blocked(q, k, v, bias, t, qt, ht, norm, block=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _blocked(q, k, v, bias, t, qt, ht, norm, block=16)
    assert out.dtype == torch.float32 and max_diff(out, ref) <= 1e-6


def test_native_kernel_matches_torch_passes_in_bf16_and_long_buckets():
    """The kernel against the engine's own PyTorch passes on the same tiles: bf16 scores (the kernel evaluates SiLU
    in fp32 before rounding, the passes in bf16, so they agree to bf16 precision) and uint8 bucket ids (used past
    LONG_BUCKET_PAIRS causal pairs)."""
    if native_mod.load() is None:
        pytest.skip("the native HSTU kernel could not be built here (no C compiler?): see the genrec.native log")
    import genrec.ops.block_layout as block_layout_mod

    q, k, v, bias, t, qt, ht, _ = _inputs(2, 2, 70, dqk=16, dv=16, has_time=[True, False])
    norm = torch.tensor([70.0])
    w = torch.randn(2, 2, 70, 16)
    for dtype, long_pairs in ((torch.float32, 0), (torch.bfloat16, 1 << 23)):
        old = block_layout_mod.LONG_BUCKET_PAIRS
        block_layout_mod.LONG_BUCKET_PAIRS = long_pairs  # 0: every batch stores uint8 bucket ids
        try:
            runs = []
            for nat in (False, True):
                qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
                out = _blocked(qq, kk, vv, bias, t, qt, ht, norm, block=16, native=nat)
                grads = _grads(out.float(), w, [qq, kk, vv, bias.pos_w, bias.ts_w])
                runs.append((out.detach().float(), grads))
        finally:
            block_layout_mod.LONG_BUCKET_PAIRS = old
        tol = 1e-5 if dtype == torch.float32 else 0.02
        (ref, ref_g), (out, out_g) = runs
        assert max_diff(out, ref) <= tol * max(1.0, float(ref.abs().max()))
        for name, a, b in zip("q k v pos_w ts_w".split(), ref_g, out_g):
            assert max_diff(b.float(), a.float()) <= tol * max(1.0, float(a.abs().max())), (dtype, name)


def test_c_loop_is_the_fp32_default_and_refuses_what_it_cannot_run(monkeypatch):
    """fp32 runs the whole tile loop in C when PyTorch's BLAS sgemm was found; bf16 runs the kernel between ATen
    matmuls; loop=True where the loop cannot run is an error, not a silent fallback; without sgemm the engine
    falls back to its chunks with the same result."""
    import genrec.ops.hstu_attention as ha

    lib = native_mod.load()
    if lib is None or not lib.has_sgemm:
        pytest.skip("the native HSTU kernel or PyTorch's BLAS sgemm is unavailable here")
    layout = block_layout(torch.tensor([40]), 16, 1)
    assert ha._Tiles(layout, None, None, None, torch.float32, lib).loop
    assert not ha._Tiles(layout, None, None, None, torch.bfloat16, lib).loop
    assert not ha._Tiles(layout, None, None, None, torch.float32, lib, loop=False).loop
    q, k, v, bias, t, qt, ht, _ = _inputs(1, 2, 40, dqk=8, dv=8)
    norm = torch.tensor([40.0])
    with pytest.raises(RuntimeError, match="loop=True"):
        _blocked(*(x.detach().bfloat16() for x in (q, k, v)), bias, t, qt, ht, norm, block=16, loop=True)
    ref = _plain(q, k, v, bias, t, qt, ht, norm)
    monkeypatch.setattr(lib, "has_sgemm", False)
    with pytest.raises(RuntimeError, match="loop=True"):
        _blocked(q, k, v, bias, t, qt, ht, norm, block=16, loop=True)
    assert max_diff(_blocked(q, k, v, bias, t, qt, ht, norm, block=16), ref) <= 1e-5


def test_sgemm_is_checked_before_the_loop_uses_it():
    """The C loop only takes a BLAS sgemm that computes a small product right: a function that leaves the result
    untouched (say, a BLAS with another calling convention) is refused, and so is none."""
    import ctypes

    lib = native_mod.load()
    if lib is None:
        pytest.skip("the native HSTU kernel could not be built here (no C compiler?): see the genrec.native log")
    noop = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))(lambda *args: None)
    had = lib.has_sgemm
    try:
        assert lib.set_sgemm(ctypes.cast(noop, ctypes.c_void_p).value) is False and not lib.has_sgemm
        assert lib.set_sgemm(None) is False
    finally:
        assert lib.set_sgemm(native_mod._blas_sgemm()) == had


def test_native_off_by_environment(monkeypatch):
    monkeypatch.setattr(native_mod, "_STATE", {})
    monkeypatch.setenv("GENREC_NATIVE", "0")
    assert native_mod.load() is None
    q, k, v, bias, t, qt, ht, _ = _inputs(1, 1, 20)
    with pytest.raises(RuntimeError, match="native=True"):
        _blocked(q, k, v, bias, t, qt, ht, torch.tensor([20.0]), native=True)
    ref = _plain(q, k, v, bias, t, qt, ht, torch.tensor([20.0]))
    assert max_diff(_blocked(q, k, v, bias, t, qt, ht, torch.tensor([20.0])), ref) <= 1e-5  # falls back


def test_native_build_failure_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native_mod, "_STATE", {})
    monkeypatch.delenv("GENREC_NATIVE", raising=False)
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native_mod.load() is None
    assert "CC=" in caplog.text and "PyTorch implementations" in caplog.text


def test_native_disabled_context_restores_state():
    lib = native_mod.load()
    with native_mod.disabled():
        assert native_mod.load() is None
    assert native_mod.load() is lib


@pytest.mark.parametrize("loop, heads", [(False, 2), (None, 2), (None, 3)],
                         ids=["kernel", "loop-heads-split", "loop-groups-split"])
def test_native_kernel_on_two_threads_matches_one_thread(loop, heads):
    """Built with OpenMP, the kernel splits a large chunk across torch's threads, each thread summing the bias
    gradients privately; the C loop splits the heads between two threads when they divide evenly (2 heads), else
    the key-block groups, with the query-side sums per thread (3 heads): the same values as one thread (up to
    summation order)."""
    if native_mod.load() is None:
        pytest.skip("the native HSTU kernel could not be built here (no C compiler?): see the genrec.native log")
    q, k, v, bias, t, qt, ht, _ = _inputs(2, heads, 300, dqk=16, dv=16, has_time=[True, False])
    norm = torch.tensor([300.0])
    w = torch.randn(2, heads, 300, 16)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)  # diagonal chunk: 10 tiles x 2 heads x 64² scores, above the split size
            out = _blocked(q, k, v, bias, t, qt, ht, norm, block=64, native=True, loop=loop)
            runs.append((out.detach(), _grads(out, w, [q, k, v, bias.pos_w, bias.ts_w])))
    finally:
        torch.set_num_threads(before)
    (ref, ref_g), (out, out_g) = runs
    assert max_diff(out, ref) <= 1e-6
    for name, a, b in zip("q k v pos_w ts_w".split(), ref_g, out_g):
        assert max_diff(a, b) <= 1e-5 * max(1.0, float(a.abs().max())), name


def test_native_time_bucket_ids_equal_torch_ids():
    """The kernel's one-pass bucket ids against the PyTorch passes: equal on random timestamps (rows without time
    included; rows spanning many buckets, where the kernel takes a log per pair) and on sorted ones (rows spanning
    a few buckets, where it counts thresholds; the largest gaps past the last bucket), and on gaps sampled around
    every bucket boundary equal except within an ulp of the boundary."""
    import math

    from genrec.ops.block_layout import TileBuckets

    lib = native_mod.load()
    if lib is None:
        pytest.skip("the native HSTU kernel could not be built here (no C compiler?): see the genrec.native log")
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([70, 5, 130, 33])
    layout = block_layout(lengths, 16, 2)
    slots = layout.num_blocks * 16
    cases = []
    for scale in (100, 10**6, 10**9, 10**12):
        cases.append((torch.randint(0, scale, (layout.num_blocks, 16), generator=g),
                      torch.randint(0, scale, (layout.num_blocks, 16), generator=g)))
    for scale in (3, 10**4, 10**16):
        t = torch.cumsum(torch.randint(0, scale, (slots + 1,), generator=g), 0)
        cases.append((t[:-1].view(-1, 16), t[1:].view(-1, 16)))
    for t, qt in cases:
        timed = torch.rand(layout.num_blocks, generator=g) > 0.3
        ref = TileBuckets(layout, t, qt, timed, NB)
        fast = TileBuckets(layout, t, qt, timed, NB, lib=lib)
        assert slots > 0 and len(ref.chunks) == len(fast.chunks)
        for a, b in zip(ref.chunks, fast.chunks):
            assert torch.equal(a.long(), b.long())
    gaps = []
    for b in range(1, NB + 1):
        c = round(math.exp(0.301 * b))
        ulp = 2 ** max(0, c.bit_length() - 24)  # fp32 spacing of gaps near c
        gaps.append((c + ulp * torch.arange(-200, 200)).clamp(min=1))
    gaps = torch.cat(gaps)
    n = len(gaps) // 16 * 16
    qt = gaps[:n].view(-1, 16)
    t = torch.zeros_like(qt)
    out = torch.empty(len(qt), 16, 16, dtype=torch.uint8)
    timed = torch.ones(len(qt), dtype=torch.uint8)  # held: the kernel only gets its pointer
    tile = torch.arange(len(qt))  # tile i: query block i against key block i
    lib.time_buckets(native_mod.BucketArgs(slot_qt=qt.data_ptr(), slot_t=t.data_ptr(), timed=timed.data_ptr(),
                                           qi=tile.data_ptr(), ki=tile.data_ptr(), out=out.data_ptr(), n=len(qt),
                                           B=16, nb=NB, out_dtype=1))
    mine = out[:, :, 0].reshape(-1).long()
    ref = time_buckets(gaps[:n].view(1, -1), torch.zeros(1, 1, dtype=torch.long), NB).view(-1)
    differ = (mine != ref).nonzero().view(-1)
    assert len(differ) <= n // 10_000
    for i in differ.tolist():  # only where log(gap) / 0.301 is within fp32 rounding of an integer, by one bucket
        exact = math.log(int(gaps[i])) / 0.301
        assert abs(exact - round(exact)) < 1e-7 * exact + 5e-7 and abs(int(mine[i]) - int(ref[i])) == 1
