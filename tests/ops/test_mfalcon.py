"""M-FALCON (genrec.ops.mfalcon): cached microbatched scores equal scoring each candidate alone."""

import pytest
import torch

from genrec.data.batches import Batch
from genrec.ops.mfalcon import (
    build_history_cache,
    score_candidates,
    score_candidates_one_by_one,
    score_candidates_uncached,
)
from tests.ops import make_model, max_diff


def _request(n=9, m=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, 21, (n,), generator=g)
    times = torch.cumsum(torch.randint(0, 100_000, (n,), generator=g), 0)
    cands = torch.randint(1, 21, (m,), generator=g)
    return hist, times, int(times[-1]) + 54_321, cands


@pytest.mark.parametrize("kw", [{}, {"attention_norm": "length"}, {"use_position_bias": False}])
@pytest.mark.parametrize("has_time", [True, False])
def test_cached_microbatches_equal_each_candidate_alone(kw, has_time):
    model = make_model(max_len=12, **kw)
    hist, times, req, cands = _request()
    with torch.no_grad():
        ref_out, ref_scores = score_candidates_one_by_one(model, hist, times, req, cands, 5, has_time=has_time)
        cache = build_history_cache(model, hist, times, req, has_time=has_time)
        for b_m in (1, 4, 11, 64):  # 4 does not divide 11
            out, scores = score_candidates(model, cache, cands, microbatch=b_m)
            assert out.shape == (11, 8) and scores.shape == (11,)
            assert max_diff(scores, ref_scores) <= 1e-5
            assert max_diff(out, ref_out) <= 1e-5
        out, scores = score_candidates_uncached(model, hist, times, req, cands, microbatch=3, has_time=has_time)
        assert max_diff(scores, ref_scores) <= 1e-5


def test_time_bias_uses_the_request_time():
    model = make_model(max_len=12)
    hist, times, req, cands = _request()
    with torch.no_grad():
        a = score_candidates(model, build_history_cache(model, hist, times, req), cands)[1]
        b = score_candidates(model, build_history_cache(model, hist, times, req + 10**7), cands)[1]
    assert not torch.allclose(a, b, atol=1e-4)


def test_cache_is_reused_across_calls_and_history_outputs_match_encode():
    model = make_model(max_len=12)
    hist, times, req, cands = _request()
    with torch.no_grad():
        cache = build_history_cache(model, hist, times, req)
        keys = [k.clone() for k in cache.keys]
        first = score_candidates(model, cache, cands[:5], microbatch=2)[1]
        score_candidates(model, cache, cands[5:], microbatch=3)
        again = score_candidates(model, cache, cands[:5], microbatch=2)[1]
        n = len(hist)
        qt = torch.cat([times[1:], torch.tensor([req])])
        one = Batch(hist.view(1, n), times.view(1, n), qt.view(1, n), torch.tensor([n]), torch.tensor([True]))
        enc = model.encode(one)
    assert all(torch.equal(a, b) for a, b in zip(keys, cache.keys))
    assert torch.equal(first, again)
    assert max_diff(cache.history_out, enc[0]) <= 1e-5  # attention_norm="max_len": the history alone


def test_long_history_is_truncated_to_max_len_minus_one():
    model = make_model(max_len=8)
    hist, times, req, cands = _request(n=15, m=4)
    with torch.no_grad():
        cache = build_history_cache(model, hist, times, req)
        assert cache.n == 7
        ref = score_candidates_one_by_one(model, hist, times, req, cands)[1]
        assert max_diff(score_candidates(model, cache, cands, microbatch=3)[1], ref) <= 1e-5
