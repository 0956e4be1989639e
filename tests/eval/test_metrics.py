"""Metrics against hand-computed rankings (numbers below are worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genrec.eval.metrics import (
    RankAccumulator,
    metrics_from_ranks,
    pad_histories,
    sample_candidates,
    target_ranks,
)
from genrec.eval.protocol import EvalProtocol

NEG_INF = float("-inf")


def _row(*values: float) -> torch.Tensor:
    """One score row; column 0 (padding) gets a huge score to prove it is ignored."""
    return torch.tensor([[1e9, *values]], dtype=torch.float32)


# ---------------------------------------------------------------- metrics_from_ranks
def test_metrics_from_hand_ranks() -> None:
    m = metrics_from_ranks(torch.tensor([1, 3, 11]), hr_ks=(1, 10, 50), ndcg_ks=(10, 50))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["HR@50"] == pytest.approx(1.0)
    # rank 1 -> 1/log2(2) = 1; rank 3 -> 1/log2(4) = 0.5; rank 11 -> 1/log2(12), only inside @50
    assert m["NDCG@10"] == pytest.approx((1 + 0.5) / 3)
    assert m["NDCG@50"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    assert m["count"] == 3
    assert list(m) == ["HR@1", "HR@10", "HR@50", "NDCG@10", "NDCG@50", "MRR", "count"]


def test_metrics_keys_sorted_and_numpy_input() -> None:
    m = metrics_from_ranks(np.array([2, 2]), hr_ks=[10, 1], ndcg_ks=[10, 1])
    assert list(m) == ["HR@1", "HR@10", "NDCG@1", "NDCG@10", "MRR", "count"]
    assert m["HR@1"] == 0.0 and m["HR@10"] == 1.0
    assert m["NDCG@10"] == pytest.approx(1 / math.log2(3))
    assert m["MRR"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [[], [0, 1], [1.0, float("nan")]])
def test_metrics_reject_bad_ranks(bad: list) -> None:
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array(bad), (10,), (10,))


# ---------------------------------------------------------------- target_ranks
def test_rank_basic_and_padding_column_ignored() -> None:
    # items 1..4 score 0.1, 0.9, 0.5, 0.3; target 3 (0.5) is beaten by item 2 only -> rank 2
    assert target_ranks(_row(0.1, 0.9, 0.5, 0.3), torch.tensor([3])).tolist() == [2]
    assert target_ranks(_row(0.1, 0.9, 0.5, 0.3), torch.tensor([2])).tolist() == [1]
    assert target_ranks(_row(0.1, 0.9, 0.5, 0.3), torch.tensor([1])).tolist() == [4]


def test_rank_with_exclusions() -> None:
    scores = _row(0.1, 0.9, 0.5, 0.3)
    # excluding item 2 (score 0.9) lifts target 3 to rank 1; zeros are padding
    ranks = target_ranks(scores, torch.tensor([3]), exclude=torch.tensor([[2, 0, 0]]))
    assert ranks.tolist() == [1]
    # target 1 (0.1): items 2, 3, 4 beat it; excluding 3 and 4 leaves rank 2
    ranks = target_ranks(scores, torch.tensor([1]), exclude=torch.tensor([[0, 3, 4]]))
    assert ranks.tolist() == [2]


def test_rank_target_in_exclusion_list_is_kept() -> None:
    scores = _row(0.1, 0.9, 0.5, 0.3)
    # history contains the target 3 and item 2: item 2 removed, target kept -> rank 1
    assert target_ranks(scores, torch.tensor([3]), exclude=torch.tensor([[3, 2]])).tolist() == [1]
    # only the target excluded -> as if nothing was excluded
    assert target_ranks(scores, torch.tensor([3]), exclude=torch.tensor([[3, 3]])).tolist() == [2]


def test_rank_ties_are_pessimistic() -> None:
    # items 1, 2, 3 all score 0.5: whichever is the target, all three are >= it -> rank 3
    scores = _row(0.5, 0.5, 0.5, 0.1)
    assert target_ranks(scores, torch.tensor([2])).tolist() == [3]
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3]
    # target 4 (0.1) is last of 4 candidates
    assert target_ranks(scores, torch.tensor([4])).tolist() == [4]
    # excluding one tied item -> rank 2
    assert target_ranks(scores, torch.tensor([2]), exclude=torch.tensor([[1]])).tolist() == [2]


def test_rank_all_equal_scores_gives_worst_rank() -> None:
    scores = torch.zeros(1, 11)  # 10 items, all tied
    assert target_ranks(scores, torch.tensor([7])).tolist() == [10]


def test_rank_with_candidate_mask() -> None:
    # 6 items; candidates = target 3 + items 1 and 5 (sampled protocol)
    scores = _row(0.9, 0.8, 0.5, 0.7, 0.6, 0.95)
    mask = torch.tensor([[True, True, False, True, False, True, False]])  # col 0 True on purpose
    # among {1: 0.9, 3: 0.5, 5: 0.6}: target 3 is last -> rank 3 (col 0 never counts)
    assert target_ranks(scores, torch.tensor([3]), candidate_mask=mask).tolist() == [3]
    # exclusion combines with the mask: drop item 1 -> rank 2
    ranks = target_ranks(scores, torch.tensor([3]), torch.tensor([[1]]), candidate_mask=mask)
    assert ranks.tolist() == [2]
    # the target is a candidate even if the mask forgets it: target 6 (0.95) -> rank 1
    assert target_ranks(scores, torch.tensor([6]), candidate_mask=mask).tolist() == [1]


def test_rank_infinite_and_nan_scores() -> None:
    # -inf target: every candidate is >= it -> worst rank (4 candidates)
    assert target_ranks(_row(NEG_INF, 0.0, 1.0, NEG_INF), torch.tensor([1])).tolist() == [4]
    # NaN target -> worst rank; NaN competitor counts as beating the target
    assert target_ranks(_row(float("nan"), 0.2, 0.3), torch.tensor([1])).tolist() == [3]
    assert target_ranks(_row(float("nan"), 0.2, 0.3), torch.tensor([3])).tolist() == [2]


def test_rank_batch_mixed_rows() -> None:
    scores = torch.tensor(
        [
            [0.0, 0.1, 0.9, 0.5, 0.3],
            [0.0, 0.5, 0.5, 0.5, 0.1],
            [0.0, 0.4, 0.3, 0.2, 0.1],
        ]
    )
    targets = torch.tensor([3, 2, 4])
    exclude = torch.tensor([[2, 0], [0, 0], [1, 4]])  # row 2 excludes its own target 4
    # row 0: 2 excluded -> 1; row 1: 3-way tie -> 3; row 2: {2: .3, 3: .2, 4: .1} -> 3
    assert target_ranks(scores, targets, exclude=exclude).tolist() == [1, 3, 3]


def test_rank_does_not_modify_inputs() -> None:
    scores = torch.rand(3, 8)
    mask = torch.rand(3, 8) > 0.5
    scores_copy, mask_copy = scores.clone(), mask.clone()
    target_ranks(scores, torch.tensor([1, 2, 3]), torch.tensor([[1], [2], [4]]), mask)
    assert torch.equal(scores, scores_copy) and torch.equal(mask, mask_copy)


def _naive_rank(scores: np.ndarray, target: int, exclude: set[int], cands: set[int]) -> int:
    """Reference rank with an explicit loop (for cross-checking the vectorised version)."""
    keep = (cands - exclude) | {target}
    return sum(1 for j in keep if scores[j] >= scores[target])


def test_rank_matches_naive_loop_on_random_batch() -> None:
    rng = np.random.default_rng(0)
    batch, num_items = 64, 30
    scores = rng.integers(0, 8, size=(batch, num_items + 1)).astype(np.float32)  # many ties
    targets = rng.integers(1, num_items + 1, size=batch)
    exclude = rng.integers(0, num_items + 1, size=(batch, 6))
    mask = rng.random((batch, num_items + 1)) < 0.5
    got = target_ranks(
        torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(exclude),
        torch.from_numpy(mask),
    )
    expected = [
        _naive_rank(
            scores[i], int(targets[i]), set(exclude[i].tolist()),
            {j for j in range(1, num_items + 1) if mask[i, j]},
        )
        for i in range(batch)
    ]
    assert got.dtype == torch.long and got.tolist() == expected


@pytest.mark.parametrize("target", [0, 5])
def test_rank_rejects_out_of_range_target(target: int) -> None:
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(1, 5), torch.tensor([target]))


def test_rank_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(5), torch.tensor([1]))
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(2, 5), torch.tensor([1]))
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(1, 5), torch.tensor([1]), exclude=torch.tensor([[7]]))
    with pytest.raises(ValueError):
        target_ranks(torch.zeros(1, 5), torch.tensor([1]), candidate_mask=torch.ones(1, 4).bool())


# ---------------------------------------------------------------- accumulator
def test_accumulator_concatenates_batches() -> None:
    acc = RankAccumulator()
    acc.add(torch.tensor([1, 3]))
    acc.add(np.array([11]))
    assert len(acc) == 3
    proto = EvalProtocol(hr_ks=(1, 10), ndcg_ks=(10,))
    m = acc.compute(proto)
    assert list(m) == ["HR@1", "HR@10", "NDCG@10", "MRR", "count"]
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx(0.5)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    acc.reset()
    with pytest.raises(ValueError):
        acc.compute(proto)


def test_accumulator_rejects_zero_rank() -> None:
    with pytest.raises(ValueError):
        RankAccumulator().add(torch.tensor([0]))


# ---------------------------------------------------------------- sample_candidates
def test_sample_candidates_excludes_interacted_and_keeps_target() -> None:
    histories = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([2])]
    targets = [4, 6, 2]
    mask = sample_candidates(histories, targets, num_items=10, num_negatives=5,
                             rng=np.random.default_rng(0))
    assert mask.shape == (3, 11) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [6, 6, 6]
    assert not mask[:, 0].any()
    for i, (hist, target) in enumerate(zip(histories, targets)):
        assert mask[i, target]
        others = set(torch.nonzero(mask[i]).flatten().tolist()) - {target}
        assert not others & set(hist.tolist())


def test_sample_candidates_takes_all_when_pool_is_exact() -> None:
    mask = sample_candidates([np.array([1, 2])], [2], num_items=5, num_negatives=3,
                             rng=np.random.default_rng(0))
    assert torch.nonzero(mask[0]).flatten().tolist() == [2, 3, 4, 5]


def test_sample_candidates_too_few_items_raises() -> None:
    with pytest.raises(ValueError, match="non-interacted"):
        sample_candidates([np.array([1, 2, 3])], [3], num_items=5, num_negatives=3,
                          rng=np.random.default_rng(0))


def test_sample_candidates_seeded_and_batch_independent() -> None:
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, 50, size=8) for _ in range(6)]
    targets = [int(h[-1]) for h in histories]
    a = sample_candidates(histories, targets, 50, 10, np.random.default_rng(7))
    b = sample_candidates(histories, targets, 50, 10, np.random.default_rng(7))
    assert torch.equal(a, b)
    gen = np.random.default_rng(7)  # same users, batches of 4 + 2, one generator
    c = torch.cat([
        sample_candidates(histories[:4], targets[:4], 50, 10, gen),
        sample_candidates(histories[4:], targets[4:], 50, 10, gen),
    ])
    assert torch.equal(a, c)
    d = sample_candidates(histories, targets, 50, 10, np.random.default_rng(8))
    assert not torch.equal(a, d)


def test_sample_candidates_roughly_uniform() -> None:
    # pool = {3, 4, 5, 6}; 2 of 4 drawn each time -> each item in ~50% of 2000 rows
    histories = [np.array([1, 2])] * 2000
    mask = sample_candidates(histories, [2] * 2000, num_items=6, num_negatives=2,
                             rng=np.random.default_rng(0))
    freq = mask[:, 3:].float().mean(dim=0)
    assert torch.all((freq - 0.5).abs() < 0.05)


def test_sampled_protocol_end_to_end_rank() -> None:
    # num_items = 4, user saw {1, 2}, target 2; negatives must be 3 and 4
    mask = sample_candidates([np.array([1, 2])], [2], 4, 2, np.random.default_rng(0))
    scores = _row(0.99, 0.5, 0.7, 0.1)  # item 1 (seen) scores highest but is not a candidate
    assert target_ranks(scores, torch.tensor([2]), candidate_mask=mask).tolist() == [2]


# ---------------------------------------------------------------- pad_histories
def test_pad_histories() -> None:
    out = pad_histories([np.array([1, 2, 3]), np.array([4]), np.array([], dtype=np.int64)])
    assert out.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_histories([np.array([1, 2, 3])], max_len=2).tolist() == [[2, 3]]
    assert pad_histories([np.array([], dtype=np.int64)]).tolist() == [[0]]


def test_per_user_values_average_to_the_metrics():
    from genrec.eval.metrics import per_user_values

    ranks = np.array([1, 3, 10, 11, 250, 2])
    m = metrics_from_ranks(ranks, [1, 10], [10])
    for name in ("HR@1", "HR@10", "NDCG@10", "MRR"):
        assert per_user_values(ranks, name).mean() == pytest.approx(m[name])
    for bad in ("AUC", "HR@0", "NDCG@x", "HR"):
        with pytest.raises(ValueError, match="expected HR@k, NDCG@k or MRR"):
            per_user_values(ranks, bad)
    with pytest.raises(ValueError, match=">= 1"):
        per_user_values(np.array([0, 2]), "MRR")


def test_paired_bootstrap_of_ranks():
    """A model whose every rank is better has a positive difference whose interval excludes 0; swapping the
    models negates it; a model against itself gives 0 and an interval that does not exclude 0; seeds average."""
    from genrec.eval.metrics import paired_bootstrap_ranks, per_user_values

    rng = np.random.default_rng(0)
    b = rng.integers(1, 60, size=(2, 3000))
    a = np.maximum(b - rng.integers(0, 4, size=b.shape), 1)  # never worse, often better
    ab = paired_bootstrap_ranks(a, b, "NDCG@10", num_resamples=300)
    ba = paired_bootstrap_ranks(b, a, "NDCG@10", num_resamples=300)
    expected = per_user_values(a, "NDCG@10").mean() - per_user_values(b, "NDCG@10").mean()
    assert ab.diff == pytest.approx(expected) and ab.diff > 0
    assert ab.excludes_zero and ab.ci_low > 0 and ab.seeds_agree
    assert ba.diff == pytest.approx(-ab.diff) and ba.ci_high == pytest.approx(-ab.ci_low)
    same = paired_bootstrap_ranks(b, b, "HR@10", num_resamples=50)
    assert same.diff == 0 and not same.excludes_zero
    # one seed against two: the seed-mean difference, unpaired seeds
    one = paired_bootstrap_ranks(a[0], b, "MRR", num_resamples=50)
    assert one.seed_diffs is None and len(one.b_per_seed) == 2
    assert one.diff == pytest.approx((1.0 / a[0]).mean() - (1.0 / b).mean())
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap_ranks(a[:, :10], b, "MRR")
