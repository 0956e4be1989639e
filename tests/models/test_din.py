"""DIN: the ranking contract, target attention that responds to the candidate, unnormalised (paper) and softmax
(released code) weights, Dice, and learning a history-dependent signal."""

from __future__ import annotations

import math

import pytest
import torch

from genrec.data.ranking_batch import RankingBatch
from genrec.models.din import DIN, Dice, DINConfig
from tests.models.test_ranking_floors import (
    SCHEMA,
    check_contract,
    replace,
    synthetic_batch,
    task_auc,
    train,
)

SMALL = {"embedding_dim": 8, "attention_mlp": (16, 8), "mlp": (32, 16)}


def config(**over) -> DINConfig:
    return DINConfig(**{**SMALL, **over})


@pytest.mark.parametrize("over", [
    {}, {"activation": "dice"}, {"attention_normalization": "softmax"}, {"use_history_actions": False},
])  # fmt: skip
def test_contract(over: dict) -> None:
    torch.manual_seed(0)
    check_contract(DIN(SCHEMA, config(**over)))


def _one_history_two_candidates() -> RankingBatch:
    """One user, history [2, 4, 7, 9], candidates 4 and 7."""
    return RankingBatch(
        user_ids=torch.tensor([3]), hist_items=torch.tensor([[2, 4, 7, 9]]), hist_actions=torch.tensor([[1, 2, 4, 1]]),
        hist_times=torch.tensor([[1, 2, 3, 4]]), hist_lengths=torch.tensor([4]), cand_items=torch.tensor([[4, 7]]),
        cand_times=torch.tensor([[9, 9]]), cand_mask=torch.tensor([[True, True]]),
        user_features=torch.tensor([[1, 2]]), dense_features=torch.zeros(1, 2, 2),
    )  # fmt: skip


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_attention_weights_respond_to_the_candidate(normalization: str) -> None:
    torch.manual_seed(0)
    model = DIN(SCHEMA, config(attention_normalization=normalization))
    train(model, synthetic_batch(64, seed=3), steps=30, lr=2e-2)  # move off the near-uniform initial weights
    batch = _one_history_two_candidates()
    with torch.no_grad():
        w = model.attention_weights(batch)  # [1, 2, 4]
    assert w.shape == (1, 2, 4)
    assert (w[0, 0] - w[0, 1]).abs().max() > 1e-2  # same history, two candidates -> different weights
    if normalization == "softmax":
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 2))
    else:
        assert not torch.allclose(w.sum(-1), torch.ones(1, 2))  # the paper's weights are not normalised


def test_unnormalised_pooling_is_the_weighted_sum() -> None:
    """With no softmax the pooled interest of a candidate is Σ_j w_j h_j: duplicating the history doubles it."""
    torch.manual_seed(0)
    model = DIN(SCHEMA, config()).eval()
    batch = _one_history_two_candidates()
    doubled = replace(batch, hist_items=batch.hist_items.repeat(1, 2), hist_actions=batch.hist_actions.repeat(1, 2),
                      hist_times=batch.hist_times.repeat(1, 2), hist_lengths=batch.hist_lengths * 2)  # fmt: skip
    with torch.no_grad():
        w1, w2 = model.attention_weights(batch), model.attention_weights(doubled)
        torch.testing.assert_close(w2, w1.repeat(1, 1, 2))  # each event's weight depends on (event, candidate) only
        h = model.history_embeddings(batch)[0]  # [4, d]
        pooled = w1[0] @ h  # [2, d]
        h2 = model.history_embeddings(doubled)[0]
        torch.testing.assert_close(w2[0] @ h2, 2 * pooled)


def test_empty_history_and_padding_get_zero_weight() -> None:
    torch.manual_seed(0)
    model = DIN(SCHEMA, config(attention_normalization="softmax")).eval()
    batch = synthetic_batch(16, seed=2)
    assert (batch.hist_lengths == 0).any()
    with torch.no_grad():
        w = model.attention_weights(batch)  # [B, C, L]
        logits = model(batch)
    L = batch.hist_items.shape[1]
    pad_hist = (torch.arange(L) >= batch.hist_lengths.unsqueeze(1)).unsqueeze(1).expand_as(w)
    assert (w[pad_hist] == 0).all()
    assert torch.isfinite(logits).all()
    with_hist = (batch.hist_lengths > 0).unsqueeze(1) & batch.cand_mask  # [B, C]
    torch.testing.assert_close(w.sum(-1)[with_hist], torch.ones(int(with_hist.sum())))


def test_history_actions_change_the_interest() -> None:
    torch.manual_seed(0)
    batch = _one_history_two_candidates()
    other = replace(batch, hist_actions=torch.tensor([[4, 4, 4, 4]]))
    with_actions = DIN(SCHEMA, config()).eval()
    torch.manual_seed(0)
    without = DIN(SCHEMA, config(use_history_actions=False)).eval()
    with torch.no_grad():
        assert not torch.allclose(with_actions(batch), with_actions(other))
        torch.testing.assert_close(without(batch), without(other))


def test_dice_is_the_papers_formula() -> None:
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, -1.0]))
    x = torch.randn(64, 3) * 2 + 1
    dice.train()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)
    dice.eval()  # running statistics: one example's output no longer depends on the others
    torch.testing.assert_close(dice(x[:1]), dice(x)[:1])


@pytest.mark.parametrize("over", [{}, {"activation": "dice"}])
def test_din_learns_synthetic_signals(over: dict) -> None:
    torch.manual_seed(0)
    model = DIN(SCHEMA, config(**over))
    losses = train(model, synthetic_batch(400, seed=40), steps=50, lr=2e-2)
    assert losses[-1] < 0.7 * losses[0]
    test = synthetic_batch(300, seed=41)
    with torch.no_grad():
        logits = model(test)
    assert task_auc(logits, test, 0) > 0.75  # taste match (PReLU about 0.80, Dice about 0.97 with these seeds)
    assert task_auc(logits, test, 1) > 0.75  # candidate popularity


def test_config_and_batch_errors() -> None:
    with pytest.raises(ValueError, match="activation"):
        DINConfig(activation="relu")
    with pytest.raises(ValueError, match="attention_normalization"):
        DINConfig(attention_normalization="sigmoid")
    model = DIN(SCHEMA, config())
    batch = synthetic_batch(4, seed=0)
    with pytest.raises(ValueError, match="user_ids"):
        model(replace(batch, user_ids=torch.full((4,), 99)))
    with pytest.raises(ValueError, match="labels is None"):
        model.loss(replace(batch, labels=None))


def test_output_biases_start_at_the_base_rates() -> None:
    rates = (0.02, 0.7)
    torch.manual_seed(0)
    model = DIN(SCHEMA, config(task_base_rates=rates))
    logit = torch.tensor([math.log(r / (1 - r)) for r in rates])
    assert torch.allclose(model.heads.bias.detach(), logit, atol=1e-6)
    with torch.no_grad():
        model.heads.weight.zero_()
    batch = synthetic_batch(5, seed=1)
    probs = torch.sigmoid(model(batch))[batch.cand_mask]  # [N, T]
    assert torch.allclose(probs, torch.tensor(rates).expand_as(probs), atol=1e-6)


@pytest.mark.parametrize("rates", [(0.0, 0.5), (0.5, 1.0), (0.5,), (float("nan"), 0.5)])
def test_refuses_bad_base_rates(rates) -> None:
    with pytest.raises(ValueError, match="task_base_rates"):
        DIN(SCHEMA, config(task_base_rates=rates))
