"""Ranking floors (item popularity, hashed logistic regression) and the shared ranking contract (batch checks,
multi-task loss). Also holds the synthetic ranking data and contract checks that the DLRM and DIN tests reuse."""

from __future__ import annotations

import math

import pytest
import torch

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.ranking_floors import (
    ItemPopularityRanker,
    LogisticRegressionRanker,
    multitask_bce_loss,
    multitask_bce_per_task,
)

SCHEMA = RankingSchema(
    num_items=20, num_users=12, tasks=("match", "popular"), actions=("view", "like", "share"),
    user_features=("age", "region"), user_feature_sizes=(5, 3), dense_features=("signal", "noise"),
)  # fmt: skip


def synthetic_batch(rows: int, seed: int, L: int = 6, C: int = 4, labels: bool = True) -> RankingBatch:
    """Rows of a toy world with learnable signals.

    Users have a taste (user id parity) and their histories hold mostly items of that parity. Task "match" is 1
    when the candidate's parity equals the taste (learnable from user id, history or their interaction with the
    candidate; dense feature 0 is a noisy copy of it); task "popular" is 1 mostly for items 1..6 (learnable from
    the candidate id alone). Histories have 0..L events, rows have 1..C candidates; the rest is padding.
    """
    g = torch.Generator().manual_seed(seed)
    B = rows
    user_ids = torch.randint(1, SCHEMA.num_users + 1, (B,), generator=g)
    taste = user_ids % 2  # [B]
    hist_lengths = torch.randint(0, L + 1, (B,), generator=g)
    raw = torch.randint(1, SCHEMA.num_items // 2 + 1, (B, L), generator=g) * 2 - 1  # odd items 1..19
    same = torch.rand(B, L, generator=g) < 0.9
    # odd items for taste 1, even items for taste 0 (90% of events)
    hist_items = torch.where(same, raw + (1 - taste).unsqueeze(1), raw + taste.unsqueeze(1))  # in 1..20
    real_h = torch.arange(L) < hist_lengths.unsqueeze(1)
    hist_items = hist_items * real_h
    hist_actions = torch.randint(1, 1 << SCHEMA.num_actions, (B, L), generator=g) * real_h
    hist_times = (torch.arange(L) + 100).expand(B, L) * real_h
    n_cand = torch.randint(1, C + 1, (B,), generator=g)
    cand_mask = torch.arange(C) < n_cand.unsqueeze(1)
    cand_items = torch.randint(1, SCHEMA.num_items + 1, (B, C), generator=g) * cand_mask
    cand_times = torch.full((B, C), 1000) * cand_mask
    match = ((cand_items % 2) == taste.unsqueeze(1)).float()  # the candidate has the user's taste parity
    popular = ((cand_items <= 6).float() * 0.8 + 0.1 > torch.rand(B, C, generator=g)).float()
    lab = torch.stack([match, popular], dim=-1) * cand_mask.unsqueeze(-1)  # [B, C, 2]
    dense = torch.stack([match + 0.7 * torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)], dim=-1)
    dense = dense * cand_mask.unsqueeze(-1)
    user_features = torch.stack([torch.randint(0, 6, (B,), generator=g), torch.randint(0, 4, (B,), generator=g)], 1)
    batch = RankingBatch(
        user_ids=user_ids, hist_items=hist_items, hist_actions=hist_actions, hist_times=hist_times,
        hist_lengths=hist_lengths, cand_items=cand_items, cand_times=cand_times, cand_mask=cand_mask,
        user_features=user_features, dense_features=dense, labels=lab if labels else None,
    )  # fmt: skip
    batch.validate(SCHEMA)
    return batch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by pairwise comparison (ties count 1/2); scores and labels are 1-D."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    assert len(pos) and len(neg), "AUC needs both classes"
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def task_auc(logits: torch.Tensor, batch: RankingBatch, task: int) -> float:
    return auc(logits[..., task][batch.cand_mask], batch.labels[..., task][batch.cand_mask])


def train(model: torch.nn.Module, batch: RankingBatch, steps: int, lr: float = 1e-2) -> list[float]:
    """Full-batch Adam steps on ``model.loss(batch)``; returns the losses."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(batch)[0]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def pad(batch: RankingBatch, extra_hist: int = 0, extra_cand: int = 0) -> RankingBatch:
    """The same examples with more right padding on the history and candidate axes."""
    B = batch.hist_items.shape[0]

    def widen(t: torch.Tensor | None, extra: int) -> torch.Tensor | None:
        if t is None or extra == 0:
            return t
        return torch.cat([t, t.new_zeros(B, extra, *t.shape[2:])], dim=1)

    return RankingBatch(
        user_ids=batch.user_ids, hist_items=widen(batch.hist_items, extra_hist),
        hist_actions=widen(batch.hist_actions, extra_hist), hist_times=widen(batch.hist_times, extra_hist),
        hist_lengths=batch.hist_lengths, cand_items=widen(batch.cand_items, extra_cand),
        cand_times=widen(batch.cand_times, extra_cand), cand_mask=widen(batch.cand_mask, extra_cand),
        user_features=batch.user_features, dense_features=widen(batch.dense_features, extra_cand),
        labels=widen(batch.labels, extra_cand),
    )  # fmt: skip


def replace(batch: RankingBatch, **over) -> RankingBatch:
    fields = {k: getattr(batch, k) for k in batch.__dataclass_fields__}
    fields.update(over)
    return RankingBatch(**fields)


def check_contract(model: torch.nn.Module, trained_steps: int = 3) -> None:
    """Shapes, padding invariance, candidate independence and label blindness of a ranking model.

    The model is first trained a few steps so that no check passes only because of an initialisation symmetry.
    Checks run in eval mode.
    """
    batch = synthetic_batch(24, seed=1)
    if trained_steps:
        train(model, batch, trained_steps)
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        B, C = batch.cand_items.shape
        assert logits.shape == (B, C, SCHEMA.num_tasks) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        assert (logits[~batch.cand_mask] == 0).all()  # padded candidates: logit 0
        real = batch.cand_mask
        # padding invariance: more history and candidate padding changes no real candidate's logits
        padded = model(pad(batch, extra_hist=5, extra_cand=3))
        torch.testing.assert_close(padded[:, :C][real], logits[real], rtol=1e-5, atol=1e-6)
        # candidate independence: replacing the other candidates of row 0 keeps candidate 0's logits
        row = int(torch.nonzero(batch.cand_mask.sum(1) >= 2)[0])
        items = batch.cand_items.clone()
        items[row, 1:] = torch.where(batch.cand_mask[row, 1:], (items[row, 1:] % SCHEMA.num_items) + 1, 0)
        dense = batch.dense_features.clone()
        dense[row, 1:] += 3.0 * batch.cand_mask[row, 1:].unsqueeze(-1)
        other = model(replace(batch, cand_items=items, dense_features=dense))
        torch.testing.assert_close(other[row, 0], logits[row, 0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(other[row, 1:][batch.cand_mask[row, 1:]], logits[row, 1:][batch.cand_mask[row, 1:]])
        # a row alone gives the same logits as inside the batch
        alone = model(RankingBatch(**{k: None if v is None else v[row:row + 1] for k, v in vars(batch).items()}))
        torch.testing.assert_close(alone[0], logits[row], rtol=1e-5, atol=1e-6)
        # labels are never an input
        for labels in (None, 1.0 - batch.labels):
            torch.testing.assert_close(model(replace(batch, labels=labels)), logits)
        # a batch without real candidates, and one without any history column
        empty = replace(batch, cand_items=torch.zeros_like(batch.cand_items), cand_mask=torch.zeros_like(real))
        assert (model(empty) == 0).all() and float(model.loss(empty)[0]) == 0.0
        no_hist = torch.zeros(B, 0, dtype=torch.long)
        bare = replace(batch, hist_items=no_hist, hist_actions=no_hist, hist_times=no_hist,
                       hist_lengths=torch.zeros(B, dtype=torch.long))  # fmt: skip
        assert torch.isfinite(model(bare)).all() and (model(bare)[~real] == 0).all()


# ---------------------------------------------------------------- shared contract
def test_synthetic_batches_are_valid_and_signals_exist() -> None:
    batch = synthetic_batch(200, seed=0)
    batch.validate(SCHEMA)
    assert 0.3 < float(batch.labels[..., 0][batch.cand_mask].mean()) < 0.7
    assert (batch.hist_lengths == 0).any() and (batch.cand_mask.sum(1) < batch.cand_items.shape[1]).any()
    # the oracle signals are real: dense feature 0 and item id rank the labels
    assert auc(batch.dense_features[..., 0][batch.cand_mask], batch.labels[..., 0][batch.cand_mask]) > 0.7
    assert auc(-batch.cand_items[batch.cand_mask].float(), batch.labels[..., 1][batch.cand_mask]) > 0.7


@pytest.mark.parametrize("over, match", [
    ({"user_ids": torch.full((8,), 13)}, "user_ids"),
    ({"user_features": torch.full((8, 2), 6)}, "user_features"),
    ({"hist_actions": torch.full((8, 6), 8)}, "hist_actions"),
    ({"dense_features": torch.full((8, 4, 2), float("nan"))}, "dense_features"),
    ({"labels": torch.zeros(8, 4, 3)}, "labels: shape"),
])  # fmt: skip
def test_validate_refuses_out_of_schema_values(over, match) -> None:
    batch = replace(synthetic_batch(8, seed=3), **over)
    with pytest.raises(ValueError, match=match):
        batch.validate(SCHEMA)


def test_multitask_loss_hand_computed_and_ignores_padding() -> None:
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]]])  # [1, 3, 2]
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [float("nan"), 7.0]]])  # padding holds garbage
    mask = torch.tensor([[True, True, False]])
    got = multitask_bce_loss(logits, labels, mask, (1.0, 0.5))

    def bce(x: float, y: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    task0 = (bce(0.0, 1) + bce(1.0, 0)) / 2
    task1 = (bce(2.0, 0) + bce(-1.0, 1)) / 2
    assert float(got) == pytest.approx(task0 + 0.5 * task1, rel=1e-6)


def test_label_weights_make_each_task_a_mean_over_its_labelled_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, generator=g)
    labels = torch.randint(0, 2, (2, 3, 2), generator=g).float()
    mask = torch.tensor([[True, True, True], [True, False, False]])
    ones = torch.ones(2, 3, 2)
    # weight 1 everywhere is the unweighted loss
    assert torch.allclose(multitask_bce_per_task(logits, labels, mask, ones), multitask_bce_per_task(logits, labels, mask))
    # task 0 labelled on two candidates only, task 1 on none: the mean over those two, and 0
    w = torch.zeros(2, 3, 2)
    w[0, 1, 0] = w[1, 0, 0] = 1.0
    w[1, 1, 0] = 5.0  # a padded candidate: its weight counts for nothing
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    got = multitask_bce_per_task(logits, labels, mask, w)
    assert float(got[0]) == pytest.approx(float((bce[0, 1, 0] + bce[1, 0, 0]) / 2), rel=1e-6)
    assert float(got[1]) == 0.0
    # an unlabelled candidate's label can hold anything (it is not read)
    labels2 = labels.clone()
    labels2[0, 0] = float("nan")
    assert torch.equal(multitask_bce_per_task(logits, labels2, mask, w), got)
    with pytest.raises(ValueError, match="finite and >= 0"):
        multitask_bce_per_task(logits, labels, mask, -w)
    with pytest.raises(ValueError, match="label_weights shape"):
        multitask_bce_per_task(logits, labels, mask, w[..., :1])


def test_multitask_loss_refuses_missing_or_bad_labels() -> None:
    logits, mask = torch.zeros(1, 2, 1), torch.tensor([[True, True]])
    with pytest.raises(ValueError, match="labels is None"):
        multitask_bce_loss(logits, None, mask, (1.0,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multitask_bce_loss(logits, torch.tensor([[[1.0], [2.0]]]), mask, (1.0,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multitask_bce_loss(logits, torch.tensor([[[1.0], [float("nan")]]]), mask, (1.0,))


def test_task_weights_are_checked() -> None:
    with pytest.raises(ValueError, match="2 tasks"):
        LogisticRegressionRanker(SCHEMA, task_weights=(1.0,))
    with pytest.raises(ValueError, match="non-negative"):
        LogisticRegressionRanker(SCHEMA, task_weights=(1.0, -1.0))


# ---------------------------------------------------------------- item popularity
def test_popularity_is_the_smoothed_positive_rate() -> None:
    schema = RankingSchema(num_items=3, num_users=1, tasks=("click",), actions=("a",))
    batch = RankingBatch(
        user_ids=torch.tensor([1, 1, 1, 1]), hist_items=torch.zeros(4, 0, dtype=torch.long),
        hist_actions=torch.zeros(4, 0, dtype=torch.long), hist_times=torch.zeros(4, 0, dtype=torch.long),
        hist_lengths=torch.zeros(4, dtype=torch.long),
        cand_items=torch.tensor([[1, 1], [1, 2], [2, 0], [1, 0]]), cand_times=torch.ones(4, 2, dtype=torch.long),
        cand_mask=torch.tensor([[True, True], [True, True], [True, False], [True, False]]),
        user_features=torch.zeros(4, 0, dtype=torch.long), dense_features=torch.zeros(4, 2, 0),
        labels=torch.tensor([[[1.0], [1.0]], [[0.0], [0.0]], [[1.0], [1.0]], [[1.0], [0.0]]]),
    )  # fmt: skip
    # item 1: 4 impressions, 3 positives; item 2: 2 impressions, 1 positive; padded label of row 2 is ignored
    model = ItemPopularityRanker(schema, prior_strength=2.0).fit([batch])
    g = 4 / 6
    p1, p2, p3 = (3 + 2 * g) / (4 + 2), (1 + 2 * g) / (2 + 2), g
    query = replace(batch, cand_items=torch.tensor([[1, 2], [3, 0], [1, 0], [1, 0]]), labels=None,
                    cand_mask=torch.tensor([[True, True], [True, False], [True, False], [True, False]]))
    probs = torch.sigmoid(model(query))
    assert probs[0, 0, 0].item() == pytest.approx(p1, rel=1e-5)
    assert probs[0, 1, 0].item() == pytest.approx(p2, rel=1e-5)
    assert probs[1, 0, 0].item() == pytest.approx(p3, rel=1e-5)  # an unseen item gets the global rate
    assert probs.shape == (4, 2, 1) and model(batch)[2, 1, 0] == 0  # padded candidate: logit 0


def test_popularity_needs_fit_and_labels() -> None:
    model = ItemPopularityRanker(SCHEMA)
    with pytest.raises(RuntimeError, match="fit"):
        model(synthetic_batch(4, seed=0))
    with pytest.raises(ValueError, match="labels is None"):
        model.fit([synthetic_batch(4, seed=0, labels=False)])
    with pytest.raises(ValueError, match="prior_strength"):
        ItemPopularityRanker(SCHEMA, prior_strength=0.0)


def test_popularity_contract_and_learns_item_popularity() -> None:
    model = ItemPopularityRanker(SCHEMA).fit([synthetic_batch(300, seed=10)])
    check_contract(model, trained_steps=0)
    test = synthetic_batch(300, seed=11)
    with torch.no_grad():
        logits = model(test)
    assert task_auc(logits, test, task=1) > 0.75
    assert float(model.loss(test)[0]) > 0
    state = model.state_dict()
    assert set(state) == {"positives", "impressions"}
    again = ItemPopularityRanker(SCHEMA)
    again.load_state_dict(state)
    torch.testing.assert_close(again(test), logits)


# ---------------------------------------------------------------- logistic regression
def test_logistic_regression_contract() -> None:
    torch.manual_seed(0)
    check_contract(LogisticRegressionRanker(SCHEMA, num_buckets=1 << 12))


def test_logistic_regression_learns_dense_and_id_signals() -> None:
    torch.manual_seed(0)
    model = LogisticRegressionRanker(SCHEMA, num_buckets=1 << 12)
    losses = train(model, synthetic_batch(300, seed=20), steps=60, lr=5e-2)
    assert losses[-1] < losses[0]
    test = synthetic_batch(300, seed=21)
    with torch.no_grad():
        logits = model(test)
    assert task_auc(logits, test, task=0) > 0.75  # from the dense feature (its own AUC is about 0.84)
    assert task_auc(logits, test, task=1) > 0.75  # from the candidate id


def test_logistic_regression_hash_is_deterministic_and_spreads_fields() -> None:
    model = LogisticRegressionRanker(SCHEMA, num_buckets=1 << 16)
    ids = torch.tensor([[5, 5, 5, 5], [0, 0, 0, 0], [2**40, 1, 2, 3]])
    b = model.buckets(ids)
    assert b.shape == (3, 4) and b.min() >= 0 and b.max() < 1 << 16
    assert len(set(b[0].tolist())) == 4  # the same id in four fields: four different buckets
    torch.testing.assert_close(LogisticRegressionRanker(SCHEMA, num_buckets=1 << 16).buckets(ids), b)


def test_logistic_regression_biases_can_start_at_the_base_rates() -> None:
    rates = (0.01, 0.6)
    model = LogisticRegressionRanker(SCHEMA, num_buckets=1 << 12, task_base_rates=rates)
    assert torch.allclose(model.bias.detach(), torch.tensor([math.log(r / (1 - r)) for r in rates]), atol=1e-6)
    with torch.no_grad():
        model.dense.weight.zero_()
    batch = synthetic_batch(5, seed=3)
    probs = torch.sigmoid(model(batch))[batch.cand_mask]  # [N, T]
    assert torch.allclose(probs, torch.tensor(rates).expand_as(probs), atol=1e-6)
    assert torch.equal(LogisticRegressionRanker(SCHEMA, num_buckets=8).bias.detach(), torch.zeros(2))
    with pytest.raises(ValueError, match="task_base_rates"):
        LogisticRegressionRanker(SCHEMA, num_buckets=8, task_base_rates=(0.5, 1.0))
