"""Popularity and transition-chain baselines: hand-computed scores, dense/sparse parity, direct counting on an
ML-1M-sized sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.eval.metrics import pad_histories, target_ranks
from genrec.models.baselines import PopularityRecommender, TransitionChainRecommender

# Two toy users: 1 -> 2 -> 3 and 1 -> 2 -> 4 (4 items).
TOY = [np.array([1, 2, 3]), np.array([1, 2, 4])]


# ---------------------------------------------------------------- popularity
def test_popularity_scores_are_counts() -> None:
    model = PopularityRecommender().fit([np.array([1, 2, 2, 3]), np.array([2, 0, 0])], num_items=4)
    scores = model.score([np.array([1]), np.array([3, 4])])
    assert scores.shape == (2, 5) and scores.dtype == torch.float32
    assert scores[:, 0].eq(float("-inf")).all()
    assert scores[0, 1:].tolist() == [1.0, 3.0, 1.0, 0.0]  # padding zeros not counted
    assert torch.equal(scores[0], scores[1])


def test_popularity_returns_fresh_tensor() -> None:
    model = PopularityRecommender().fit(TOY, num_items=4)
    first = model.score([np.array([1])])
    first[0, 2] = -1.0
    assert model.score([np.array([1])])[0, 2] == 2.0


def test_popularity_errors() -> None:
    with pytest.raises(RuntimeError):
        PopularityRecommender().score([np.array([1])])
    with pytest.raises(ValueError):
        PopularityRecommender().fit([np.array([1, 5])], num_items=4)


# ---------------------------------------------------------------- transition chain
def test_chain_order1_is_first_order_markov() -> None:
    model = TransitionChainRecommender(order=1, pop_weight=0.0).fit(TOY, num_items=4)
    scores = model.score([np.array([1]), np.array([3, 2])])
    assert scores.shape == (2, 5) and scores[:, 0].eq(float("-inf")).all()
    # P(.|1) = {2: 1}; P(.|2) = {3: 1/2, 4: 1/2}
    assert scores[0, 1:].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert scores[1, 1:].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5])


def test_chain_order2_hand_computed() -> None:
    model = TransitionChainRecommender(order=2, decay=0.5, count_decay=0.5, pop_weight=0.0)
    model.fit(TOY, num_items=4)
    # counts: d=1 gives 1->2 (x2), 2->3, 2->4 with weight 1; d=2 gives 1->3, 1->4 with weight .5
    # P(.|1) = {2: 2/3, 3: 1/6, 4: 1/6};  P(.|2) = {3: 1/2, 4: 1/2}
    # history [1, 2]: h_-1 = 2 (weight 1), h_-2 = 1 (weight .5)
    scores = model.score([np.array([1, 2])])[0, 1:]
    assert scores.tolist() == pytest.approx([0.0, 1 / 3, 1 / 2 + 1 / 12, 1 / 2 + 1 / 12])


def test_chain_pairs_do_not_cross_sequences() -> None:
    # 3 ends user A, 4 starts user B: no 3 -> 4 transition may be counted
    model = TransitionChainRecommender(order=3, pop_weight=0.0).fit(
        [np.array([1, 2, 3]), np.array([4, 1])], num_items=4
    )
    assert model.score([np.array([3])])[0, 1:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_chain_popularity_breaks_ties_only() -> None:
    model = TransitionChainRecommender(order=1).fit(
        [np.array([1, 2]), np.array([1, 3]), np.array([3, 4]), np.array([3, 4])], num_items=5
    )
    scores = model.score([np.array([1])])[0]
    # 2 and 3 tie on P(.|1) = 1/2; 3 is more popular (3 vs 1 occurrences) -> ranked first
    assert scores[3] > scores[2] > scores[4] > scores[5]
    assert scores[2] - 0.5 < 1e-5 and scores[4] < 1e-5  # the tie-break term is tiny
    # 5 never occurs: only items with neither transitions nor counts get exactly 0
    assert scores[5] == 0.0


def test_chain_ignores_padding_and_short_histories() -> None:
    model = TransitionChainRecommender(order=3, pop_weight=0.0).fit(TOY, num_items=4)
    padded = model.score([np.array([0, 0, 1])])
    assert torch.equal(padded, model.score([np.array([1])]))
    empty = model.score([np.array([], dtype=np.int64)])
    assert empty[0, 1:].abs().sum() == 0


def test_chain_batch_equals_single_rows() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 40, size=rng.integers(2, 30)) for _ in range(100)]
    model = TransitionChainRecommender().fit(seqs, num_items=40)
    histories = [rng.integers(1, 40, size=rng.integers(1, 12)) for _ in range(16)]
    batch = model.score(histories)
    for i, h in enumerate(histories):
        assert torch.allclose(batch[i], model.score([h])[0])


def test_chain_dense_and_sparse_agree() -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 60, size=rng.integers(2, 40)) for _ in range(200)]
    histories = [rng.integers(1, 60, size=rng.integers(1, 15)) for _ in range(32)]
    dense = TransitionChainRecommender(order=5).fit(seqs, num_items=60)
    sparse = TransitionChainRecommender(order=5, dense_max_items=0).fit(seqs, num_items=60)
    assert dense.dense_ is not None and sparse.sparse_ is not None
    assert torch.allclose(dense.score(histories), sparse.score(histories), atol=1e-6)


def test_chain_rows_are_probabilities() -> None:
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 30, size=20) for _ in range(50)]
    model = TransitionChainRecommender(order=4).fit(seqs, num_items=30)
    sums = model.dense_.sum(dim=1)  # type: ignore[union-attr]
    assert sums[0] == 0 and torch.allclose(sums[1:][sums[1:] > 0], torch.ones(1), atol=1e-5)


def test_chain_ranks_true_next_item_first() -> None:
    # deterministic cycle 1 -> 2 -> 3 -> 4 -> 5 -> 1: the next item must be ranked 1st
    seqs = [np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])] * 5
    model = TransitionChainRecommender().fit(seqs, num_items=5)
    histories = [np.array([1, 2]), np.array([3, 4])]
    ranks = target_ranks(model.score(histories), torch.tensor([3, 5]),
                         exclude=pad_histories(histories))
    assert ranks.tolist() == [1, 1]


@pytest.mark.parametrize(
    "kwargs", [{"order": 0}, {"decay": 0.0}, {"decay": 1.5}, {"count_decay": -1.0},
               {"pop_weight": -1e-6}],
)
def test_chain_rejects_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransitionChainRecommender(**kwargs)


def test_chain_errors() -> None:
    with pytest.raises(RuntimeError):
        TransitionChainRecommender().score([np.array([1])])
    with pytest.raises(ValueError):
        TransitionChainRecommender().fit([np.array([1, 9])], num_items=4)
    model = TransitionChainRecommender().fit(TOY, num_items=4)
    with pytest.raises(ValueError):
        model.score([np.array([7])])


def test_chain_on_an_ml1m_sized_sample_equals_direct_counting() -> None:
    # ~1/4 of ML-1M (250K interactions, 3.7K items, default order 8): the vectorised fit (one np.unique over all
    # pairs) and both storages give the scores of counting every pair directly, row by row
    rng = np.random.default_rng(3)
    num_items, order, decay = 3706, 8, 0.7
    seqs = [rng.integers(1, num_items + 1, size=165) for _ in range(1500)]
    dense = TransitionChainRecommender(order=order, decay=decay).fit(seqs, num_items=num_items)
    sparse = TransitionChainRecommender(order=order, decay=decay, dense_max_items=0).fit(seqs, num_items=num_items)
    histories = [s[: rng.integers(1, 165)] for s in seqs[:64]]

    needed = np.unique(np.concatenate([h[-order:] for h in histories]))  # rows P(. | a) the scores read
    row_of = {int(a): i for i, a in enumerate(needed)}
    counts = np.zeros((len(needed), num_items + 1))
    for seq in seqs:
        for d in range(1, order + 1):
            a, b = seq[:-d], seq[d:]
            keep = np.isin(a, needed)
            np.add.at(counts, ([row_of[int(x)] for x in a[keep]], b[keep]), decay ** (d - 1))
    probs = counts / counts.sum(1, keepdims=True)
    popularity = np.bincount(np.concatenate(seqs), minlength=num_items + 1).astype(np.float64)
    prior = 1e-6 * popularity / popularity.max()
    expected = np.zeros((len(histories), num_items + 1))
    for i, h in enumerate(histories):
        for s, item in enumerate(h[::-1][:order]):
            expected[i] += decay**s * probs[row_of[int(item)]]
    expected += prior
    expected[:, 0] = -np.inf

    for model in (dense, sparse):
        scores = model.score(histories)
        assert scores.shape == (64, num_items + 1)
        assert torch.allclose(scores, torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-7)
