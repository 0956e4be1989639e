"""Stochastic Length (SL): sparsify long training sequences so that attention costs O(N^α·d) instead of O(N²·d).

Paper: Zhai et al., ICML 2024, §3.3 and §5 (sparsity table for α ∈ {1.6, 1.8, 2.0}); the reference repository does
not ship it. The rule, for a training sequence of n items and maximum
sequence length N::

    n <= N^{α/2}:  keep the sequence whole
    n >  N^{α/2}:  keep it whole with probability N^α / n², otherwise subsample it to N^{α/2} items

so E[n_kept²] <= N^α + N^α: the attention work per sequence is O(N^α) in expectation. α ∈ (1, 2]; α = 2 keeps every
sequence with n <= N (N^2 / n² >= 1).

Choices and deviations (the paper gives the rule, not these details):
- Subsampling draws ``k`` distinct positions uniformly at random and keeps them in their original (time) order;
  kept items keep their own timestamps. The paper samples positions; it does not say how.
- ``k = ceil(N^{α/2})`` (so a subsampled sequence is never shorter than N^{α/2}). The paper's example "a 4096-long
  sequence is usually cut to 776 tokens" at α = 1.6 (4096^0.8 = 776.05) suggests it rounds down; the two differ by
  at most one item.
- What n is: the items one training row uses. In genrec that is the window of the most recent ``max_len + 1``
  items of a user (``training_batch``): apply SL to that window (N = ``max_len``), then build inputs/targets from
  consecutive kept items (each kept item predicts the next kept item).
- Randomness: an explicit ``numpy.random.Generator`` (the data pipeline's kind); the same seed gives the same
  indices. A sequence with n > N^{α/2} always consumes one uniform draw, plus the subsample draw when cut.

Training: ``train.stochastic_length_alpha`` (``genrec.data.batches.training_batch``, ``genrec.train.loop``).

Public: ``target_length``, ``keep_probability``, ``expected_kept``, ``stochastic_length_indices``, ``stochastic_length_batch``,
``expected_sparsity``, ``sampled_sparsity``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def _check(max_len: int, alpha: float) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 0.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (0, 2], got {alpha}")


def target_length(max_len: int, alpha: float) -> int:
    """k = ceil(N^{α/2}): the length a subsampled sequence is cut to (the 1e-9 guards against N^{α/2} landing a
    rounding error above an integer)."""
    _check(max_len, alpha)
    return max(1, math.ceil(max_len ** (alpha / 2) - 1e-9))


def keep_probability(n: int, max_len: int, alpha: float) -> float:
    """Probability that a sequence of n items is kept whole: 1 for n <= k, else min(1, N^α / n²)."""
    if n <= target_length(max_len, alpha):
        return 1.0
    return min(1.0, max_len**alpha / n**2)


def stochastic_length_indices(n: int, max_len: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted, int64) of the items of an n-item sequence that SL keeps: ``arange(n)`` or k sorted
    positions drawn uniformly without replacement."""
    k = target_length(max_len, alpha)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    if rng.random() < max_len**alpha / n**2:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def stochastic_length_batch(
    lengths: Iterable[int], max_len: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``stochastic_length_indices`` for every sequence, in order (one generator, so one seed fixes the batch)."""
    return [stochastic_length_indices(int(n), max_len, alpha, rng) for n in lengths]


def expected_kept(n: int, max_len: int, alpha: float) -> float:
    """E[items kept] of an n-item sequence: p·n + (1 - p)·min(k, n), p = keep_probability(n)."""
    p = keep_probability(n, max_len, alpha)
    return p * n + (1.0 - p) * min(target_length(max_len, alpha), n)


def expected_sparsity(lengths: Iterable[int], max_len: int, alpha: float) -> float:
    """Expected fraction of tokens dropped over sequences of ``lengths``: 1 - Σ E[kept] / Σ n, with
    E[kept] = p·n + (1 - p)·k and p = keep_probability(n)."""
    total = kept = 0.0
    for n in lengths:
        total += int(n)
        kept += expected_kept(int(n), max_len, alpha)
    return 0.0 if total == 0 else 1.0 - kept / total


def sampled_sparsity(lengths: Iterable[int], max_len: int, alpha: float, rng: np.random.Generator) -> float:
    """Fraction of tokens dropped in one draw of SL over sequences of ``lengths``."""
    lengths = [int(n) for n in lengths]
    kept = sum(len(i) for i in stochastic_length_batch(lengths, max_len, alpha, rng))
    total = sum(lengths)
    return 0.0 if total == 0 else 1.0 - kept / total
