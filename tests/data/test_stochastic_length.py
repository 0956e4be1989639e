"""Stochastic Length (genrec.data.stochastic_length): the paper's rule, determinism, bounds and statistics."""

import math

import numpy as np
import pytest

from genrec.data.stochastic_length import (
    expected_sparsity,
    keep_probability,
    sampled_sparsity,
    stochastic_length_batch,
    stochastic_length_indices,
    target_length,
)


def test_target_length_is_ceil_of_n_to_the_half_alpha():
    assert target_length(200, 2.0) == 200
    assert target_length(200, 1.6) == math.ceil(200**0.8)  # 69.3 -> 70
    assert target_length(4096, 1.6) == 777  # 4096^0.8 = 776.05
    assert target_length(100, 1.0) == 10  # exactly 10, no rounding up past it
    with pytest.raises(ValueError):
        target_length(200, 2.5)


def test_deterministic_with_seed_and_sorted_unique_indices():
    lengths = [5, 150, 200, 199, 80, 120]
    a = stochastic_length_batch(lengths, 200, 1.6, np.random.default_rng(7))
    b = stochastic_length_batch(lengths, 200, 1.6, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for n, idx in zip(lengths, a):
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n  # order kept, no repeats


@pytest.mark.parametrize("alpha", [1.2, 1.6, 1.8, 2.0])
def test_never_below_n_to_the_half_alpha(alpha):
    rng = np.random.default_rng(0)
    k = 200 ** (alpha / 2)
    for n in range(1, 201):
        idx = stochastic_length_indices(n, 200, alpha, rng)
        assert len(idx) >= min(n, k)
        assert len(idx) in (n, target_length(200, alpha))


def test_alpha_two_keeps_everything_up_to_max_len():
    rng = np.random.default_rng(0)
    lengths = list(range(1, 201)) * 3
    assert sampled_sparsity(lengths, 200, 2.0, rng) == 0.0
    assert expected_sparsity(lengths, 200, 2.0) == 0.0


def test_keep_whole_frequency_matches_formula():
    N, alpha, n, trials = 200, 1.6, 150, 4000
    p = N**alpha / n**2  # 0.2135
    assert keep_probability(n, N, alpha) == pytest.approx(p)
    rng = np.random.default_rng(123)
    whole = sum(len(stochastic_length_indices(n, N, alpha, rng)) == n for _ in range(trials))
    assert abs(whole / trials - p) <= 4 * math.sqrt(p * (1 - p) / trials)


def test_subsample_positions_are_uniform():
    rng = np.random.default_rng(5)
    counts = np.zeros(150)
    for _ in range(3000):
        idx = stochastic_length_indices(150, 200, 1.2, rng)  # k = 24; kept whole with prob. 0.0257
        if len(idx) < 150:
            counts[idx] += 1
    freq = counts / counts.sum() * 150  # 1 everywhere if uniform
    assert abs(freq.mean() - 1) < 1e-9 and freq.std() < 0.15


def test_sampled_sparsity_matches_expected():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 201, size=3000)
    exp = expected_sparsity(lengths, 200, 1.6)
    assert 0.3 < exp < 0.9
    assert sampled_sparsity(lengths, 200, 1.6, np.random.default_rng(1)) == pytest.approx(exp, abs=0.01)
