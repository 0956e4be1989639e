"""In-batch negatives with logQ correction in ``sampled_softmax_loss`` (mixed negative sampling)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from genrec.train.loop import train
from genrec.train.loss import sampled_softmax_loss

from .test_loop import _config

TAU = 0.05


def _example(seed=0, items=10, dim=4):
    g = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(items + 1, dim, generator=g), dim=-1)
    user = F.normalize(torch.randn(2, 4, dim, generator=g), dim=-1)
    # item 3 is the target of three positions: popular in this batch, so in-batch draws often hit it
    targets = torch.tensor([[3, 2, 3, 0], [3, 4, 7, 0]])
    return table, user, targets


def _reference(table, user, targets, items, k, kb, mode, seed, correct_positive=True):
    """The loss written out position by position: explicit logits, logQ corrections and masking."""
    g = torch.Generator().manual_seed(seed)
    valid = targets > 0
    u, t = user[valid], targets[valid]
    m = len(t)
    shape = {"shared": (k,), "per_sequence": (targets.shape[0], k), "per_position": (m, k)}[mode]
    neg = torch.randint(1, items + 1, shape, generator=g)  # the uniform draws come first
    batch_ids = t[torch.randint(0, m, (kb,), generator=g)]  # then K_b targets of real positions
    row_of = torch.arange(targets.shape[0]).unsqueeze(1).expand_as(targets)[valid]
    counts = {}
    for item in t.tolist():
        counts[item] = counts.get(item, 0) + 1

    def log_e(item):  # expected occurrences among a position's candidates
        return math.log(k / items + kb * counts.get(int(item), 0) / m)

    losses = []
    for i in range(m):
        n = neg if mode == "shared" else neg[row_of[i]] if mode == "per_sequence" else neg[i]
        logits, masked = [], []
        pos = float(u[i] @ table[t[i]]) / TAU
        logits.append(pos - log_e(t[i]) if correct_positive else pos)
        masked.append(False)
        for j in [*n.tolist(), *batch_ids.tolist()]:
            logits.append(float(u[i] @ table[j]) / TAU - log_e(j))
            masked.append(j == int(t[i]))
        z = torch.tensor(logits, dtype=torch.float64).masked_fill(torch.tensor(masked), -5e4)
        losses.append(-torch.log_softmax(z, 0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("mode", ["shared", "per_sequence", "per_position"])
def test_in_batch_negatives_match_the_written_out_estimator(mode):
    table, user, targets = _example()
    vectors = lambda ids=None: table if ids is None else table[ids]  # noqa: E731
    for seed in range(4):
        loss = sampled_softmax_loss(user, targets, vectors, 10, 5, TAU, mode, generator=torch.Generator().manual_seed(seed),
                                    in_batch_negatives=6)  # fmt: skip
        ref = _reference(table, user, targets, 10, 5, 6, mode, seed)
        assert torch.allclose(loss.double(), ref, atol=1e-4), (seed, float(loss), float(ref))
        # the positive's own correction is part of it: leaving it out gives another value
        no_pos = _reference(table, user, targets, 10, 5, 6, mode, seed, correct_positive=False)
        assert not torch.allclose(loss.double(), no_pos, atol=1e-2)


def test_in_batch_draws_of_the_positive_are_masked():
    # every position has the same target: every in-batch negative equals the positive and must count for nothing
    table, user, _ = _example()
    targets = torch.tensor([[5, 5, 5, 0], [5, 5, 0, 0]])
    vectors = lambda ids=None: table if ids is None else table[ids]  # noqa: E731
    args = (user, targets, vectors, 10, 5, TAU, "per_position")
    with_batch = sampled_softmax_loss(*args, generator=torch.Generator().manual_seed(1), in_batch_negatives=7)
    ref = _reference(table, user, targets, 10, 5, 7, "per_position", 1)
    assert torch.allclose(with_batch.double(), ref, atol=1e-4)
    # e_5 = K/N + K_b, every other item K/N: the uniform loss with the positive's logit lowered by
    # log(e_5) - log(K/N) = log(1 + K_b · N / K); the masked in-batch logits add nothing to the denominator
    u, t = user[targets > 0], targets[targets > 0]
    g = torch.Generator().manual_seed(1)
    neg = torch.randint(1, 11, (len(t), 5), generator=g)
    shift = math.log(1 + 7 * 10 / 5)
    logits = torch.cat([(u * table[t]).sum(-1, keepdim=True) / TAU - shift, (u.unsqueeze(1) * table[neg]).sum(-1) / TAU],
                       dim=1).masked_fill(torch.cat([torch.zeros(len(t), 1, dtype=torch.bool), neg == 5], 1), -5e4)  # fmt: skip
    assert torch.allclose(with_batch, F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long)), atol=1e-4)


@pytest.mark.parametrize("mode", ["shared", "per_sequence", "per_position"])
def test_zero_in_batch_negatives_is_the_uniform_loss_bit_for_bit(mode):
    table, user, targets = _example(seed=3)
    vectors = lambda ids=None: table if ids is None else table[ids]  # noqa: E731
    got = sampled_softmax_loss(user, targets, vectors, 10, 6, TAU, mode, generator=torch.Generator().manual_seed(2),
                               normalizer=3.0, per_position_path="gather", in_batch_negatives=0)  # fmt: skip
    # the uniform estimator, written with the same operations
    g = torch.Generator().manual_seed(2)
    valid = targets > 0
    u, t = user[valid], targets[valid]
    pos_logit = (u * table[t]).sum(-1, keepdim=True)
    if mode == "shared":
        neg = torch.randint(1, 11, (6,), generator=g)
        neg_logit, hit = u @ table[neg].T, t.unsqueeze(1) == neg.unsqueeze(0)
    elif mode == "per_sequence":
        neg = torch.randint(1, 11, (2, 6), generator=g)
        neg_logit = torch.bmm(user, table[neg].transpose(1, 2))[valid]
        hit = t.unsqueeze(1) == neg.unsqueeze(1).expand(-1, 4, -1)[valid]
    else:
        neg = torch.randint(1, 11, (len(t), 6), generator=g)
        neg_logit, hit = torch.einsum("md,mkd->mk", u, table[neg]), t.unsqueeze(1) == neg
    logits = torch.cat([pos_logit, neg_logit], dim=1) / TAU
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hit, -5e4)], dim=1)
    want = F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long), reduction="sum") / 3.0
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["shared", "per_sequence", "per_position"])
def test_in_batch_gradients_are_finite_and_draws_repeat_with_the_seed(mode):
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(41, 8, generator=g, requires_grad=True)
    user = torch.randn(6, 9, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 6, (6, 9), generator=g)  # few distinct items: heavy repeats and masking
    targets[0, 0] = 1  # at least one real position

    def run(seed):
        vectors = lambda ids=None: F.normalize(weights if ids is None else weights[ids], dim=-1)  # noqa: E731
        return sampled_softmax_loss(F.normalize(user, dim=-1), targets, vectors, 40, 64, TAU, mode,
                                    generator=torch.Generator().manual_seed(seed), in_batch_negatives=32)  # fmt: skip

    loss = run(0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(user.grad).all() and torch.isfinite(weights.grad).all()
    assert user.grad.abs().sum() > 0 and weights.grad.abs().sum() > 0
    assert torch.equal(run(0), loss.detach()) and not torch.equal(run(1), loss.detach())


def test_in_batch_negatives_are_refused_with_the_full_softmax():
    table, user, targets = _example()
    with pytest.raises(ValueError, match="in_batch_negatives"):
        sampled_softmax_loss(user, targets, lambda ids=None: table, 10, 5, TAU, "full", in_batch_negatives=4)
    with pytest.raises(ValueError, match="in_batch_negatives"):
        sampled_softmax_loss(user, targets, lambda ids: table[ids], 10, 5, TAU, "shared", in_batch_negatives=-1)


def test_training_with_in_batch_negatives_lowers_the_loss(tmp_path):
    cfg = _config(tmp_path, "mns", extra=["train.epochs=4", "train.lr=0.01", "train.in_batch_negatives=64"])
    res = train(cfg, progress=False)
    run = tmp_path / "mns"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["loss"]) for h in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert json.loads((run / "results.json").read_text())["config"]["train"]["in_batch_negatives"] == 64
    assert res["test"]["metrics"]["HR@10"] > 0.0
