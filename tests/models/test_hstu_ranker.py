import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.hstu import HSTU, HSTUConfig
from genrec.models.hstu_ranker import HSTURanker, HSTURankerConfig, keep_most_recent
from genrec.ops.ranking_mask import logical_positions, target_aware_mask, token_valid

SCHEMA = RankingSchema(num_items=30, num_users=10, tasks=("like", "love"), actions=("click", "like", "share"),
                       user_features=("age", "sex"), user_feature_sizes=(5, 2))
VARIANTS = ("summed", "interleaved")


def _batch(B=3, L=6, C=4, seed=0, hist_lengths=None, cand_counts=None, schema=SCHEMA) -> RankingBatch:
    """Synthetic rows: increasing history times, candidates after the history, random labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(hist_lengths if hist_lengths is not None else [L] * B)
    real = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    counts = torch.tensor(cand_counts if cand_counts is not None else [C] * B)
    cand_mask = torch.arange(C).unsqueeze(0) < counts.unsqueeze(1)  # [B, C]
    times = 1_600_000_000 + torch.cumsum(torch.randint(1, 50_000, (B, L), generator=g), dim=1)  # [B, L]
    last = torch.where(real, times, torch.zeros_like(times)).max(dim=1).values  # [B]
    cand_times = last.unsqueeze(1) + torch.randint(1, 50_000, (B, C), generator=g)
    T, F_ = schema.num_tasks, len(schema.user_features)
    features = torch.stack([torch.randint(0, s + 1, (B,), generator=g) for s in schema.user_feature_sizes], dim=1) \
        if F_ else torch.zeros(B, 0, dtype=torch.long)
    return RankingBatch(
        user_ids=torch.arange(1, B + 1),
        hist_items=torch.randint(1, schema.num_items + 1, (B, L), generator=g) * real,
        hist_actions=torch.randint(0, 1 << schema.num_actions, (B, L), generator=g) * real,
        hist_times=times * real,
        hist_lengths=lengths,
        cand_items=torch.randint(1, schema.num_items + 1, (B, C), generator=g) * cand_mask,
        cand_times=cand_times * cand_mask,
        cand_mask=cand_mask,
        user_features=features,
        dense_features=torch.zeros(B, C, 0),
        labels=torch.randint(0, 2, (B, C, T), generator=g).float() * cand_mask.unsqueeze(-1),
        hist_labels=torch.randint(0, 2, (B, L, T), generator=g).float() * real.unsqueeze(-1),
    )


def _model(variant="summed", schema=SCHEMA, **kw) -> HSTURanker:
    torch.manual_seed(0)
    cfg = dict(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=3, dropout=0.0,
               linear_dropout=0.0, max_history=12)
    cfg.update(kw)
    model = HSTURanker(schema, HSTURankerConfig(variant=variant, **cfg)).eval()
    with torch.no_grad():  # larger projections than the N(0, 0.02) init, so that every dependency shows clearly
        for layer in model.layers:
            layer.uvqk.normal_(0, 0.5)
    return model


def _candidates(batch: RankingBatch, columns: list[int]) -> RankingBatch:
    """The batch with only the given candidate columns (labels follow)."""
    idx = torch.tensor(columns, dtype=torch.long)
    return dataclasses.replace(batch, cand_items=batch.cand_items[:, idx], cand_times=batch.cand_times[:, idx],
                               cand_mask=batch.cand_mask[:, idx], dense_features=batch.dense_features[:, idx],
                               labels=None if batch.labels is None else batch.labels[:, idx])


def _pad_history(batch: RankingBatch, extra: int) -> RankingBatch:
    def pad(t):
        return F.pad(t, (0, 0, 0, extra)) if t.dim() == 3 else F.pad(t, (0, extra))
    return dataclasses.replace(batch, hist_items=pad(batch.hist_items), hist_actions=pad(batch.hist_actions),
                               hist_times=pad(batch.hist_times), hist_labels=pad(batch.hist_labels))


def _pad_candidates(batch: RankingBatch, extra: int) -> RankingBatch:
    return dataclasses.replace(batch, cand_items=F.pad(batch.cand_items, (0, extra)),
                               cand_times=F.pad(batch.cand_times, (0, extra)),
                               cand_mask=F.pad(batch.cand_mask, (0, extra)),
                               dense_features=F.pad(batch.dense_features, (0, 0, 0, extra)),
                               labels=F.pad(batch.labels, (0, 0, 0, extra)))


def _clone(batch: RankingBatch) -> RankingBatch:
    return RankingBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name).clone()
                           for f in dataclasses.fields(batch)})


# ------------------------------------------------------------------------------------------------ the mask itself


def test_target_aware_mask_by_hand():
    # one row: 1 prefix token, history width 3 with 2 real tokens, 2 candidates of which 1 real
    valid = token_valid(1, torch.tensor([2]), 3, torch.tensor([[True, False]]))
    assert valid.tolist() == [[True, True, True, False, True, False]]
    mask = target_aware_mask(valid, num_candidates=2)[0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],  # prefix: itself
        [1, 1, 0, 0, 0, 0],  # history 0: prefix, itself
        [1, 1, 1, 0, 0, 0],  # history 1: prefix, history 0, itself
        [0, 0, 0, 0, 0, 0],  # history padding
        [1, 1, 1, 0, 1, 0],  # candidate: prefix, whole history, itself
        [0, 0, 0, 0, 0, 0],  # candidate padding
    ]
    assert logical_positions(1, torch.tensor([2]), 3, 2).tolist() == [[0, 1, 2, 3, 3, 3]]


# ------------------------------------------------------------------------------------------- (1) candidate mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_logits_do_not_depend_on_other_candidates(variant):
    model = _model(variant)
    batch = _batch(cand_counts=[4, 3, 4])
    with torch.no_grad():
        base = model(batch)  # [B, C, T]
        # other candidates get different items and times
        other = _clone(batch)
        other.cand_items[:, 1:] = (other.cand_items[:, 1:] % 30 + 7) % 30 + 1
        other.cand_items[~other.cand_mask] = 0
        other.cand_times[:, 1:] += 777_777 * other.cand_mask[:, 1:]
        changed = model(other)
        # more candidates (three appended), fewer candidates (only the first two)
        extra_items = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
        more = dataclasses.replace(
            batch, cand_items=torch.cat([batch.cand_items, extra_items], dim=1),
            cand_times=torch.cat([batch.cand_times, batch.cand_times[:, :1].expand(3, 3) + 99], dim=1),
            cand_mask=torch.cat([batch.cand_mask, torch.ones(3, 3, dtype=torch.bool)], dim=1),
            dense_features=torch.zeros(3, 7, 0), labels=None)
        more_logits = model(more)
        fewer = model(_candidates(batch, [0, 1]))
    assert torch.allclose(base[:, 0], changed[:, 0], atol=1e-6)
    assert not torch.allclose(base[:, 1:], changed[:, 1:], atol=1e-4)
    real = batch.cand_mask
    assert torch.allclose(base[real], more_logits[:, :4][real], atol=1e-6)
    assert torch.allclose(base[:, :2], fewer, atol=1e-6)
    # each candidate scored alone (C = 1) equals its score in the list
    for c in range(4):
        alone = _candidates(batch, [c])
        rows = alone.cand_mask[:, 0]
        with torch.no_grad():
            single = model(alone)[:, 0]
        assert torch.allclose(single[rows], base[rows, c], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_logits_depend_on_its_own_item_and_time(variant):
    model = _model(variant)
    batch = _batch()
    other = _clone(batch)
    other.cand_items[:, 0] = other.cand_items[:, 0] % 30 + 1
    later = _clone(batch)
    later.cand_times[:, 0] += 10_000_000
    with torch.no_grad():
        base, items, times = model(batch), model(other), model(later)
    assert not torch.allclose(base[:, 0], items[:, 0], atol=1e-4)
    assert not torch.allclose(base[:, 0], times[:, 0], atol=1e-5)
    assert torch.allclose(base[:, 1:], times[:, 1:], atol=1e-6)


# ---------------------------------------------------------------------------------------------------- (2) causality


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidates_see_the_most_recent_history_event(variant):
    model = _model(variant)
    batch = _batch()
    last_item, last_action = _clone(batch), _clone(batch)
    last_item.hist_items[:, -1] = last_item.hist_items[:, -1] % 30 + 1
    last_action.hist_actions[:, -1] = (last_action.hist_actions[:, -1] + 1) % 8
    with torch.no_grad():
        base = model(batch)
        assert not torch.allclose(base, model(last_item), atol=1e-4)
        assert not torch.allclose(base, model(last_action), atol=1e-4)


def test_interleaved_history_predictions_are_causal():
    model = _model("interleaved")
    batch = _batch(L=8)
    k = 4
    changed = _clone(batch)
    changed.hist_items[:, k] = changed.hist_items[:, k] % 30 + 1
    changed.hist_actions[:, k] = (changed.hist_actions[:, k] + 3) % 8
    changed.hist_times[:, k] += 1  # still before event k + 1
    with torch.no_grad():
        a, b = model.history_logits(batch), model.history_logits(changed)  # [B, L, T]
    assert torch.allclose(a[:, :k], b[:, :k], atol=1e-6)
    assert not torch.allclose(a[:, k:], b[:, k:], atol=1e-4)


def test_summed_history_states_are_causal():
    model = _model("summed")
    batch = _batch(L=8)
    k = 4
    changed = _clone(batch)
    changed.hist_items[:, k:] = changed.hist_items[:, k:] % 30 + 1
    changed.hist_actions[:, k:] = (changed.hist_actions[:, k:] + 3) % 8
    P = model.num_prefix
    with torch.no_grad():
        a, b = model._encode(batch), model._encode(changed)  # [B, P + L + C, d]
    assert torch.allclose(a[:, : P + k], b[:, : P + k], atol=1e-6)
    assert not torch.allclose(a[:, P + k:], b[:, P + k:], atol=1e-4)


# ----------------------------------------------------------------------------------------------- (3) no leakage


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_never_change_logits(variant):
    model = _model(variant)
    batch = _batch()
    flipped = dataclasses.replace(batch, labels=1 - batch.labels, hist_labels=1 - batch.hist_labels)
    unlabelled = dataclasses.replace(batch, labels=None, hist_labels=None)
    with torch.no_grad():
        base = model(batch)
        assert torch.equal(base, model(flipped))
        assert torch.equal(base, model(unlabelled))
        if variant == "interleaved":
            assert torch.equal(model.history_logits(batch), model.history_logits(flipped))


def test_interleaved_event_action_does_not_reach_its_own_prediction():
    """The item_i token predicts event i's labels: event i's own action (the thing predicted) must not reach it;
    it must reach event i + 1's prediction."""
    model = _model("interleaved")
    batch = _batch(L=8)
    for k in (0, 3, 7):
        changed = _clone(batch)
        changed.hist_actions[:, k] = 7 - changed.hist_actions[:, k]  # flip every action bit of event k
        with torch.no_grad():
            a, b = model.history_logits(batch), model.history_logits(changed)
        assert torch.allclose(a[:, : k + 1], b[:, : k + 1], atol=1e-6)
        if k + 1 < 8:
            assert not torch.allclose(a[:, k + 1:], b[:, k + 1:], atol=1e-4)


def test_summed_candidates_carry_the_unknown_action_not_a_label():
    """In the summed variant a candidate token is item + the learned unknown action: its logits move with that
    embedding and never with the labels (covered above)."""
    model = _model("summed")
    batch = _batch()
    with torch.no_grad():
        base = model(batch)
        model.unknown_action.add_(torch.randn(8))  # (a constant shift would vanish in the LayerNorms)
        moved = model(batch)
    assert not torch.allclose(base, moved, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_label_weights_restrict_each_task_to_its_labelled_candidates(variant):
    """Weight 1 everywhere is the unweighted loss; a candidate whose weight is 0 for a task does not move that
    task's loss whatever its label (the window heads of delayed feedback rely on it)."""
    model = _model(variant)
    batch = _batch(L=6, hist_lengths=[6, 2, 0], cand_counts=[4, 1, 3])
    if variant == "interleaved":
        batch = dataclasses.replace(batch, hist_labels=None)
    base_total, base = model.loss(batch)
    ones = dataclasses.replace(batch, label_weights=torch.ones_like(batch.labels))
    total, per = model.loss(ones)
    assert total.item() == pytest.approx(base_total.item(), rel=1e-6)
    w = torch.ones_like(batch.labels)
    w[0, 0, 0] = 0.0  # task 0 of candidate (0, 0) is unlabelled
    _, weighted = model.loss(dataclasses.replace(batch, label_weights=w))
    flipped = batch.labels.clone()
    flipped[0, 0, 0] = 1.0 - flipped[0, 0, 0]
    _, weighted_flipped = model.loss(dataclasses.replace(batch, labels=flipped, label_weights=w))
    task0, task1 = SCHEMA.tasks[0], SCHEMA.tasks[1]
    assert weighted[task0].item() == pytest.approx(weighted_flipped[task0].item(), rel=1e-6)
    assert weighted[task1].item() == pytest.approx(base[task1].item(), rel=1e-6)
    _, unweighted_flipped = model.loss(dataclasses.replace(batch, labels=flipped))
    assert abs(unweighted_flipped[task0].item() - base[task0].item()) > 1e-4  # the label matters when weighted 1


# ------------------------------------------------------------------------------------------- (4) padding invariance


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("contextual", [True, False])
def test_padding_does_not_change_logits(variant, contextual):
    model = _model(variant, use_contextual=contextual)
    batch = _batch(L=6, hist_lengths=[6, 2, 0], cand_counts=[4, 1, 3])
    with torch.no_grad():
        base = model(batch)
        padded_hist = model(_pad_history(batch, 5))
        padded_cand = model(_pad_candidates(batch, 3))
        alone = model(RankingBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name)[1:2]
                                      for f in dataclasses.fields(batch)}))  # fmt: skip
    assert torch.allclose(base, padded_hist, atol=1e-6)
    assert torch.allclose(base, padded_cand[:, :4], atol=1e-6)
    assert torch.equal(padded_cand[:, 4:], torch.zeros_like(padded_cand[:, 4:]))
    assert torch.equal(base[~batch.cand_mask], torch.zeros_like(base[~batch.cand_mask]))
    assert torch.allclose(base[1:2], alone, atol=1e-6)
    if variant == "interleaved":
        with torch.no_grad():
            h, hp = model.history_logits(batch), model.history_logits(_pad_history(batch, 5))
        assert torch.allclose(h, hp[:, :6], atol=1e-6)


# -------------------------------------------------------------------------------------------- history truncation


def test_keep_most_recent_cuts_from_the_left():
    batch = _batch(B=3, L=6, hist_lengths=[6, 3, 5])
    cut = keep_most_recent(batch, 4)
    assert cut.hist_lengths.tolist() == [4, 3, 4]
    assert cut.hist_items[0].tolist() == batch.hist_items[0, 2:6].tolist()
    assert cut.hist_items[1].tolist() == batch.hist_items[1, :3].tolist() + [0]
    assert cut.hist_times[2].tolist() == batch.hist_times[2, 1:5].tolist()
    assert cut.hist_actions[2].tolist() == batch.hist_actions[2, 1:5].tolist()
    assert torch.equal(cut.hist_labels[0], batch.hist_labels[0, 2:6])
    assert torch.equal(cut.hist_labels[1, 3], torch.zeros(2))
    assert keep_most_recent(batch, 6) is batch


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_keeps_the_most_recent_max_history_events(variant):
    model = _model(variant, max_history=4)
    batch = _batch(L=6, hist_lengths=[6, 3, 5])
    with torch.no_grad():
        assert torch.allclose(model(batch), model(keep_most_recent(batch, 4)), atol=1e-6)
        # the oldest event of a row longer than max_history is dropped: changing it changes nothing
        changed = _clone(batch)
        changed.hist_items[0, 0] = changed.hist_items[0, 0] % 30 + 1
        assert torch.allclose(model(batch), model(changed), atol=1e-6)


# ------------------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("variant", VARIANTS)
def test_contextual_prefix_reaches_the_candidates_only_when_on(variant):
    batch = _batch()
    other = _clone(batch)
    other.user_features[:, 0] = (other.user_features[:, 0] + 1) % 6
    on, off = _model(variant, use_contextual=True), _model(variant, use_contextual=False)
    with torch.no_grad():
        assert not torch.allclose(on(batch), on(other), atol=1e-4)
        assert torch.equal(off(batch), off(other))


# ----------------------------------------------------------------------------------------------------------- loss


def test_loss_is_weighted_mean_bce_over_real_candidates():
    model = _model("summed", task_weights=(1.0, 3.0))
    batch = _batch(cand_counts=[4, 1, 2])
    total, per_task = model.loss(batch)
    with torch.no_grad():
        logits = model(batch)
    real = batch.cand_mask
    expected = [F.binary_cross_entropy_with_logits(logits[..., t][real], batch.labels[..., t][real]) for t in range(2)]
    assert set(per_task) == {"like", "love"}
    assert torch.allclose(per_task["like"], expected[0], atol=1e-6)
    assert torch.allclose(per_task["love"], expected[1], atol=1e-6)
    assert torch.allclose(total, expected[0] + 3 * expected[1], atol=1e-6)
    # the summed variant ignores history labels (its history tokens hold their own actions)
    assert torch.equal(total, model.loss(dataclasses.replace(batch, hist_labels=None))[0])


def test_interleaved_loss_also_trains_on_history_positions():
    model = _model("interleaved")
    batch = _batch(L=5, hist_lengths=[5, 2, 0], cand_counts=[4, 1, 2])
    total, per_task = model.loss(batch)
    with torch.no_grad():
        cand, hist = model(batch), model.history_logits(batch)
    real_h = torch.arange(5).unsqueeze(0) < batch.hist_lengths.unsqueeze(1)
    for t, name in enumerate(SCHEMA.tasks):
        logits = torch.cat([cand[..., t][batch.cand_mask], hist[..., t][real_h]])
        labels = torch.cat([batch.labels[..., t][batch.cand_mask], batch.hist_labels[..., t][real_h]])
        assert torch.allclose(per_task[name], F.binary_cross_entropy_with_logits(logits, labels), atol=1e-6)
    assert torch.allclose(total, per_task["like"] + per_task["love"], atol=1e-6)
    without = model.loss(dataclasses.replace(batch, hist_labels=None))[0]
    assert not torch.allclose(total, without, atol=1e-4)


def test_task_bias_starts_at_zero_or_at_the_base_rate_logit():
    assert torch.equal(_model().head[-1].bias.detach(), torch.zeros(2))
    model = _model(task_base_rates=(0.25, 0.5))
    assert torch.allclose(model.head[-1].bias.detach(), torch.tensor([math.log(1 / 3), 0.0]), atol=1e-6)


def test_bad_inputs_are_refused_with_a_reason():
    model = _model()
    batch = _batch()
    with pytest.raises(ValueError, match="labels"):
        model.loss(dataclasses.replace(batch, labels=None))
    with pytest.raises(ValueError, match="hist_actions"):
        bad = _clone(batch)
        bad.hist_actions[0, 0] = 8  # bit 3, but the schema has 3 actions
        model(bad)
    with pytest.raises(ValueError, match="'sex'"):
        bad = _clone(batch)
        bad.user_features[0, 1] = 3
        model(bad)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        model.loss(dataclasses.replace(batch, labels=batch.labels * 2))
    with pytest.raises(ValueError, match="task_weights"):
        HSTURanker(SCHEMA, HSTURankerConfig(task_weights=(1.0,)))
    with pytest.raises(ValueError, match="variant"):
        HSTURankerConfig(variant="mixed")
    with pytest.raises(ValueError, match="task_base_rates"):
        HSTURankerConfig(task_base_rates=(0.0, 0.5))
    with pytest.raises(ValueError, match="history_logits"):
        model.history_logits(batch)


# --------------------------------------------------------------------------------------------- (5) it learns


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    diff = pos.unsqueeze(1) - neg.unsqueeze(0)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def _taste_batch(B: int, seed: int, L=8, C=4) -> RankingBatch:
    """Each user likes one half of the catalogue (odd or even ids); three quarters of the history comes from that
    half. History events are liked (action bit 0 and label 1) exactly when the item is in the user's half; a
    candidate's label is the same rule, so the model must read the user's half from the history."""
    g = torch.Generator().manual_seed(seed)
    taste = torch.randint(0, 2, (B, 1), generator=g)  # [B, 1] 0: even ids, 1: odd ids
    # three quarters of a user's history is from the user's half: the taste shows in the items and in the actions
    in_taste = torch.rand(B, L, generator=g) < 0.75
    hist_items = 2 * torch.randint(1, 11, (B, L), generator=g) - (taste == 1).long()  # [B, L] in the user's half
    hist_items = torch.where(in_taste, hist_items, hist_items + torch.where(hist_items == 20, -1, 1))
    cand_items = torch.randint(1, 21, (B, C), generator=g)
    hist_like = (hist_items % 2 == taste).long()  # [B, L]
    cand_like = (cand_items % 2 == taste).float()  # [B, C]
    times = 1_600_000_000 + torch.cumsum(torch.randint(1, 1000, (B, L + 1), generator=g), dim=1)
    schema = RankingSchema(num_items=20, num_users=B, tasks=("like",), actions=("like",))
    batch = RankingBatch(
        user_ids=torch.arange(1, B + 1), hist_items=hist_items, hist_actions=hist_like, hist_times=times[:, :L],
        hist_lengths=torch.full((B,), L), cand_items=cand_items, cand_times=times[:, L:].expand(B, C).clone(),
        cand_mask=torch.ones(B, C, dtype=torch.bool), user_features=torch.zeros(B, 0, dtype=torch.long),
        dense_features=torch.zeros(B, C, 0), labels=cand_like.unsqueeze(-1),
        hist_labels=hist_like.float().unsqueeze(-1))
    return batch, schema


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_learns_a_history_dependent_signal(variant):
    test, schema = _taste_batch(256, seed=10_000)
    torch.manual_seed(0)
    model = HSTURanker(schema, HSTURankerConfig(variant=variant, embedding_dim=16, num_blocks=2, num_heads=1,
                                                attention_dim=8, linear_dim=8, dropout=0.0, linear_dropout=0.0,
                                                max_history=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, so the trajectory is the same on every machine
    try:
        for step in range(60):  # a fresh batch of users every step: the model cannot memorise users
            loss, _ = model.loss(_taste_batch(64, seed=step)[0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        scores = model(test)[..., 0].flatten()
    auc = _auc(scores, test.labels[..., 0].flatten())
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    assert auc > 0.85, auc


# ------------------------------------------------------------------------------------ (6) the layers are HSTU's


def test_layers_equal_the_retrieval_hstu_on_history_without_candidates_or_actions():
    """No prefix, no candidates, no actions: the summed ranker's history states are the retrieval HSTU's
    (``genrec.models.hstu.HSTU.encode``) with the same weights, since both run ``HSTULayer``. HSTU's absolute
    position p corresponds to the ranker's recency N - p on full rows."""
    L = 6
    ranker = _model("summed", use_contextual=False, max_history=L)
    batch = _batch(L=L, C=0)
    batch = dataclasses.replace(batch, hist_actions=torch.zeros_like(batch.hist_actions))
    hstu = HSTU(HSTUConfig(num_items=SCHEMA.num_items, max_len=ranker.max_len, embedding_dim=8, num_blocks=2,
                           num_heads=2, attention_dim=4, linear_dim=3, dropout=0.0, linear_dropout=0.0,
                           )).eval()
    with torch.no_grad():
        hstu.item_emb.weight.copy_(ranker.item_emb.weight)
        for p in range(L):
            hstu.pos_emb.weight[p] = ranker.pos_emb.weight[L - p]
        for mine, theirs in zip(ranker.layers, hstu.layers):
            theirs.load_state_dict(mine.state_dict())
        # the ranker's query time of a history token is its own time
        seq = Batch(batch.hist_items, batch.hist_times, batch.hist_times, batch.hist_lengths,
                    torch.ones(batch.hist_items.shape[0], dtype=torch.bool))
        expected = hstu.encode(seq)  # [B, L, d], L2-normalised
        got = F.normalize(ranker._encode(batch), dim=-1, eps=1e-6)  # [B, L, d]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


# ------------------------------------------------------------------------------------- M-FALCON cached scoring


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("contextual, time_bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("microbatch", [1, 7, 11, 64])
def test_cached_scoring_equals_the_one_pass_forward(variant, contextual, time_bias, microbatch):
    model = _model(variant, use_contextual=contextual, use_time_bias=time_bias)
    # rows with a full, a short and an empty history; 11 candidate slots, some rows padded
    batch = _batch(B=3, L=6, C=11, seed=3, hist_lengths=[6, 2, 0], cand_counts=[11, 5, 8])
    with torch.no_grad():
        expected = model(batch)  # [B, C, T]
    got = model.rank_cached(batch, microbatch=microbatch)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got[~batch.cand_mask] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("contextual, time_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("shared_time", [False, True])
@pytest.mark.parametrize("microbatch", [3, 64])
def test_cached_scoring_with_candidate_tables_gives_the_same_logits(variant, contextual, time_bias, shared_time,
                                                                     microbatch):
    model = _model(variant, use_contextual=contextual, use_time_bias=time_bias)
    batch = _batch(B=3, L=6, C=11, seed=5, hist_lengths=[6, 2, 0], cand_counts=[11, 5, 8])
    if shared_time:  # one impression time per row (as Ranker batches have), 0 at padding
        batch = dataclasses.replace(batch, cand_times=batch.cand_times[:, :1] * batch.cand_mask)
    tables = model.candidate_tables()
    assert tables.first_uvqk.shape == (SCHEMA.num_items + 1, 2 * 2 * (3 + 4))
    assert tables.item_side.shape == (SCHEMA.num_items + 1, 8)
    with torch.no_grad():
        expected = model(batch)
    plain = model.rank_cached(batch, microbatch=microbatch)
    got = model.rank_cached(batch, microbatch=microbatch, tables=tables)
    # the same values, up to float rounding (a matrix product's rounding can depend on its number of rows, as it
    # does for the micro-batch size anyway)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got[~batch.cand_mask] == 0).all()


def test_candidate_tables_are_what_scoring_computes_per_item():
    model = _model("summed")
    tables = model.candidate_tables()
    batch = _batch(B=2, L=4, C=5, seed=6)
    x, _, _ = model._tokens(batch)
    with torch.no_grad():
        direct = model.layers[0].uvqk.new_tensor(0) + F.silu(
            F.layer_norm(x[:, -5:], (8,), eps=1e-6) @ model.layers[0].uvqk)  # [B, C, 2h(dv + dqk)]
    torch.testing.assert_close(tables.first_uvqk[batch.cand_items], direct, rtol=0, atol=1e-6)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.candidate_tables()


def test_cached_scoring_truncates_like_the_forward_and_refuses_training_mode():
    model = _model("interleaved", max_history=4)
    batch = _batch(B=2, L=9, C=5, seed=4, hist_lengths=[9, 3])
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(model.rank_cached(batch, microbatch=2), expected, rtol=0, atol=1e-5)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.rank_cached(batch)
    model.eval()
    with pytest.raises(ValueError, match="microbatch"):
        model.rank_cached(batch, microbatch=0)
