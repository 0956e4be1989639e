"""Ranking metrics against hand-computed values, a pairwise reference, explicit resampling and (if installed) sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.eval.ranking_metrics import (
    PROB_EPS,
    UndefinedMetricError,
    auc,
    average_precision,
    binary_entropy,
    bootstrap_user_counts,
    calibration,
    flatten_candidates,
    gauc,
    log_loss,
    multitask_ranking_metrics,
    normalized_entropy,
    paired_bootstrap,
    ranking_metrics,
    resampled_auc,
    resampled_average_precision,
)

# ---------------------------------------------------------------------------------------------------------------
# References written independently of the module: O(P * N) pairs, explicit loops.
# ---------------------------------------------------------------------------------------------------------------


def pairwise_auc(scores, labels) -> float:
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def loop_gauc(scores, labels, users, weighted=True) -> tuple[float, int]:
    s, y, u = np.asarray(scores, float), np.asarray(labels, float), np.asarray(users)
    num = den = 0.0
    counted = 0
    for user in np.unique(u):
        sel = u == user
        if 0 < y[sel].sum() < sel.sum():
            w = sel.sum() if weighted else 1.0
            num += w * pairwise_auc(s[sel], y[sel])
            den += w
            counted += 1
    return num / den, counted


def loop_log_loss(probs, labels) -> float:
    total = 0.0
    for p, y in zip(probs, labels):
        p = min(max(p, PROB_EPS), 1 - PROB_EPS)
        total += -math.log(p) if y == 1 else -math.log(1 - p)
    return total / len(probs)


def synthetic(n=3000, users=300, seed=0, signal=1.0, ties=False):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    y = (rng.random(n) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + signal * y - 0.8)))
    if ties:
        p = np.round(p, 1)
    return p, y, u


# ---------------------------------------------------------------------------------------------------------------
# AUC
# ---------------------------------------------------------------------------------------------------------------


def test_auc_hand_computed_with_ties():
    # positives 0.4, 0.8, 0.4; negatives 0.1, 0.4.
    # 0.4 beats 0.1 (1) and ties 0.4 (0.5), twice -> 3; 0.8 beats both -> 2; 5 of 6 pairs.
    assert auc([0.1, 0.4, 0.4, 0.8, 0.4], [0, 0, 1, 1, 1]) == pytest.approx(5 / 6, abs=1e-15)
    assert auc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5, abs=1e-15)  # all tied
    assert auc([0.1, 0.9], [1, 0]) == 0.0 and auc([0.1, 0.9], [0, 1]) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_auc_equals_pairwise_count(rows):
    scores = [s / 4 for s, _ in rows]  # few distinct values: many ties
    labels = [int(b) for _, b in rows]
    if len(set(labels)) < 2:
        with pytest.raises(UndefinedMetricError):
            auc(scores, labels)
        return
    assert auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_weighted_auc_equals_auc_of_repeated_examples():
    p, y, _ = synthetic(400, ties=True)
    w = np.random.default_rng(1).integers(0, 4, p.size)
    assert auc(p, y, weights=w) == pytest.approx(pairwise_auc(np.repeat(p, w), np.repeat(y, w)), abs=1e-12)


def test_auc_single_class_is_refused_with_the_reason():
    with pytest.raises(UndefinedMetricError, match=r"all 3 evaluated labels are 1 \(positives only\)"):
        auc([0.2, 0.5, 0.9], [1, 1, 1])


def test_auc_accepts_torch_tensors():
    s = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.4])
    y = torch.tensor([0, 0, 1, 1, 1])
    assert auc(s, y) == pytest.approx(5 / 6)


# ---------------------------------------------------------------------------------------------------------------
# GAUC
# ---------------------------------------------------------------------------------------------------------------

# user 7: 3 examples, AUC 1; user 3: 4 examples, pos {0.3, 0.6} vs neg {0.6, 0.1}: (0 + 1 + 0.5 + 1) / 4 = 0.625;
# user 5: positives only -> excluded.
GAUC_SCORES = [0.9, 0.2, 0.5, 0.3, 0.6, 0.6, 0.1, 0.4, 0.7]
GAUC_LABELS = [1, 0, 0, 1, 0, 1, 0, 1, 1]
GAUC_USERS = [7, 7, 7, 3, 3, 3, 3, 5, 5]


def test_gauc_three_users_one_single_class_excluded():
    value, users = gauc(GAUC_SCORES, GAUC_LABELS, GAUC_USERS)
    assert users == 2
    assert value == pytest.approx((3 * 1.0 + 4 * 0.625) / 7, abs=1e-15)
    value, users = gauc(GAUC_SCORES, GAUC_LABELS, GAUC_USERS, weighted=False)
    assert (value, users) == (pytest.approx((1.0 + 0.625) / 2, abs=1e-15), 2)


def test_gauc_matches_a_loop_over_users_with_ties_and_string_ids():
    p, y, u = synthetic(2000, users=150, ties=True)
    names = np.array([f"user-{i}" for i in u])
    for weighted in (True, False):
        value, users = gauc(p, y, names, weighted=weighted)
        ref, ref_users = loop_gauc(p, y, u, weighted=weighted)
        assert users == ref_users
        assert value == pytest.approx(ref, abs=1e-12)


def test_gauc_undefined_when_no_user_has_both_classes():
    with pytest.raises(UndefinedMetricError, match="none of the 2 users"):
        gauc([0.1, 0.2, 0.3], [1, 1, 0], [1, 1, 2])


# ---------------------------------------------------------------------------------------------------------------
# Log loss, NE, calibration
# ---------------------------------------------------------------------------------------------------------------


def test_log_loss_known_values_and_clipping():
    assert log_loss([0.9, 0.2], [1, 0]) == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, abs=1e-15)
    assert log_loss([0.0], [1]) == pytest.approx(-math.log(PROB_EPS))  # a certain miss costs -log(1e-7)
    assert log_loss([1.0], [1]) == pytest.approx(-math.log1p(-PROB_EPS))
    assert log_loss([0.3], [1], eps=1e-2) == pytest.approx(-math.log(0.3))
    p, y, _ = synthetic(500)
    assert log_loss(p, y) == pytest.approx(loop_log_loss(p, y), abs=1e-12)


def test_ne_is_one_when_predicting_the_base_rate():
    labels = [1, 0, 0, 0] * 25
    assert normalized_entropy([0.25] * 100, labels) == pytest.approx(1.0, abs=1e-12)


def test_ne_known_value_and_training_base_rate():
    ll = -(math.log(0.9) + math.log(0.8)) / 2
    assert normalized_entropy([0.9, 0.2], [1, 0]) == pytest.approx(ll / math.log(2), abs=1e-15)
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert normalized_entropy([0.9, 0.2], [1, 0], base_rate=0.1) == pytest.approx(ll / h, abs=1e-15)
    assert binary_entropy(0.5) == pytest.approx(math.log(2))


def test_ne_undefined_at_base_rate_zero():
    with pytest.raises(UndefinedMetricError, match="NE is undefined.*negatives only"):
        normalized_entropy([0.1, 0.2], [0, 0])


def test_calibration():
    assert calibration([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(1.2, abs=1e-15)
    assert calibration([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(1.0)
    with pytest.raises(UndefinedMetricError, match="no positive label"):
        calibration([0.5], [0])


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        ([0.5, 1.5], [1, 0], r"in \[0, 1\].*not logits"),
        ([0.5, float("nan")], [1, 0], "NaN or infinite"),
        ([0.5, 0.5], [1, 2], "labels: must be 0 or 1, found 2.0 at index 1"),
        ([0.5, 0.5], [1, float("nan")], "labels: must be 0 or 1, found nan"),
        ([0.5, 0.5, 0.5], [1, 0], "different lengths"),
    ],
)
def test_bad_input_is_refused(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(probs, labels, [1] * len(probs))


def test_empty_and_nan_user_inputs_are_refused():
    with pytest.raises(UndefinedMetricError, match="there is no example"):
        auc([], [])
    with pytest.raises(ValueError, match="no examples"):
        gauc([], [], [])
    with pytest.raises(ValueError, match="user_ids: 1 id"):
        gauc([0.1, 0.2], [0, 1], [1.0, float("nan")])


def test_integer_mask_is_refused():
    with pytest.raises(ValueError, match="mask: must be boolean"):
        ranking_metrics([0.5, 0.2], [1, 0], [1, 1], mask=[1, 0])


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def test_ranking_metrics_report_with_mask():
    extra_p, extra_y, extra_u = [0.99, 0.01], [0, 1], [9, 9]  # masked out: would change every metric
    mask = np.array([True] * len(GAUC_SCORES) + [False, False])
    r = ranking_metrics(GAUC_SCORES + extra_p, GAUC_LABELS + extra_y, GAUC_USERS + extra_u, mask=mask)
    assert r["auc"] == pytest.approx(pairwise_auc(GAUC_SCORES, GAUC_LABELS))
    assert r["gauc"] == pytest.approx(5.5 / 7) and r["gauc_unweighted"] == pytest.approx(0.8125)
    assert (r["gauc_users"], r["users"], r["examples"], r["positives"]) == (2, 3, 9, 5)
    assert r["base_rate"] == pytest.approx(5 / 9)
    assert r["log_loss"] == pytest.approx(loop_log_loss(GAUC_SCORES, GAUC_LABELS))
    assert r["ne"] == pytest.approx(r["log_loss"] / binary_entropy(5 / 9))
    assert r["calibration"] == pytest.approx(sum(GAUC_SCORES) / 5)
    assert r["undefined"] == {}


def test_ranking_metrics_reports_undefined_metrics_as_nan_with_reasons():
    r = ranking_metrics([0.2, 0.4, 0.7], [0, 0, 0], [1, 2, 2])
    for name in ("auc", "gauc", "gauc_unweighted", "ne", "calibration"):
        assert math.isnan(r[name]) and name in r["undefined"]
    assert "negatives only" in r["undefined"]["auc"]
    assert r["gauc_users"] == 0
    assert r["log_loss"] == pytest.approx(loop_log_loss([0.2, 0.4, 0.7], [0, 0, 0]))


def test_ranking_metrics_refuses_an_empty_selection():
    with pytest.raises(ValueError, match="no example to evaluate"):
        ranking_metrics([0.5], [1], [1], mask=[False])


def test_multitask_metrics_per_task_and_per_task_mask():
    p, y, u = synthetic(600, users=40, seed=3)
    p2, y2, _ = synthetic(600, users=40, seed=4)
    probs, labels = np.stack([p, p2], 1), np.stack([y, y2], 1)
    mask = np.ones((600, 2), dtype=bool)
    mask[::3, 1] = False
    out = multitask_ranking_metrics(probs, labels, u, ("like", "love"), mask=mask)
    assert out["like"] == ranking_metrics(p, y, u)
    assert out["love"] == ranking_metrics(p2, y2, u, mask=mask[:, 1])
    assert out["love"]["examples"] == 400


def test_multitask_errors_name_the_task():
    probs = np.array([[0.2, 0.5], [0.3, 0.5]])
    labels = np.array([[1.0, 0.0], [0.0, 3.0]])
    with pytest.raises(ValueError, match="task 'love': labels: must be 0 or 1, found 3.0 at index 1"):
        multitask_ranking_metrics(probs, labels, [1, 2], ["like", "love"])
    with pytest.raises(ValueError, match="1 names for 2 columns"):
        multitask_ranking_metrics(probs, labels, [1, 2], ["like"])


def test_flatten_candidates_keeps_real_candidates_and_splits_unknown_users():
    probs = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2) / 12  # [B=3, C=2, T=2]
    labels = torch.ones(3, 2, 2)
    cand_mask = torch.tensor([[True, True], [True, False], [True, True]])
    user_ids = torch.tensor([4, 0, 0])
    p, y, u = flatten_candidates(probs, labels, cand_mask, user_ids)
    assert p.shape == (5, 2) and y.shape == (5, 2)
    np.testing.assert_allclose(p[:, 0], np.array([0, 2, 4, 8, 10]) / 12)
    assert u.tolist() == [4, 4, -2, -3, -3]  # the two unknown-user rows stay two groups


# ---------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------------------------


def test_bootstrap_identical_models_give_zero():
    p, y, u = synthetic()
    out = paired_bootstrap(p, p.copy(), y, u, num_resamples=200)
    assert set(out) == {"auc", "gauc", "ne", "log_loss"}
    for r in out.values():
        assert r.diff == 0.0 and r.ci_low == 0.0 and r.ci_high == 0.0
        assert r.ci_low <= 0.0 <= r.ci_high and not r.excludes_zero
        assert r.num_valid == 200


def test_bootstrap_clearly_better_model_excludes_zero():
    p_good, y, u = synthetic(signal=2.0)
    rng = np.random.default_rng(5)
    p_bad = 1 / (1 + np.exp(-rng.normal(size=p_good.size)))  # unrelated to the labels
    out = paired_bootstrap(p_good, p_bad, y, u, num_resamples=300, seed=1)
    assert out["auc"].excludes_zero and out["auc"].ci_low > 0 and out["auc"].diff > 0.2
    assert out["gauc"].excludes_zero and out["gauc"].ci_low > 0
    assert out["ne"].excludes_zero and out["ne"].ci_high < 0  # lower NE is better
    assert out["log_loss"].excludes_zero and out["log_loss"].ci_high < 0
    assert out["auc"].diff == pytest.approx(auc(p_good, y) - auc(p_bad, y))
    # Swapping the models mirrors the result.
    back = paired_bootstrap(p_bad, p_good, y, u, num_resamples=300, seed=1)["auc"]
    assert back.diff == pytest.approx(-out["auc"].diff)
    assert (back.ci_low, back.ci_high) == pytest.approx((-out["auc"].ci_high, -out["auc"].ci_low))


def explicit_resample(counts_row, p_a, p_b, y, u):
    """The resampled data set itself: every copy of a drawn user becomes a new, distinct user."""
    users = np.unique(u)
    parts = []
    for k, user in enumerate(users):
        sel = np.flatnonzero(u == user)
        for copy in range(int(counts_row[k])):
            parts.append((sel, np.full(sel.size, f"{user}#{copy}")))
    idx = np.concatenate([s for s, _ in parts])
    ids = np.concatenate([i for _, i in parts])
    return p_a[idx], p_b[idx], y[idx], ids


def test_bootstrap_fast_path_equals_metrics_on_explicitly_resampled_data():
    p_a, y, u = synthetic(600, users=60, seed=7, ties=True)  # ties exercise the half-credit path
    p_b, _, _ = synthetic(600, users=60, seed=8, ties=True)
    resamples = 12
    out = paired_bootstrap(p_a, p_b, y, u, num_resamples=resamples, seed=11)
    counts = bootstrap_user_counts(60, resamples, seed=11)
    assert counts.shape == (resamples, 60) and (counts.sum(axis=1) == 60).all()
    for r in range(resamples):
        a, b, yy, ids = explicit_resample(counts[r], p_a, p_b, y, u)
        expected = {
            "auc": pairwise_auc(a, yy) - pairwise_auc(b, yy),
            "gauc": loop_gauc(a, yy, ids)[0] - loop_gauc(b, yy, ids)[0],
            "ne": normalized_entropy(a, yy) - normalized_entropy(b, yy),
            "log_loss": loop_log_loss(a, yy) - loop_log_loss(b, yy),
        }
        for metric, value in expected.items():
            assert out[metric].samples[r] == pytest.approx(value, abs=1e-12), (metric, r)


def test_resampled_auc_equals_weighted_and_plain_auc():
    p, y, u = synthetic(800, users=50, ties=True)
    counts = bootstrap_user_counts(50, 5, seed=2)
    got = resampled_auc(p, y, u, counts)
    _, inverse = np.unique(u, return_inverse=True)
    for r in range(5):
        assert got[r] == pytest.approx(auc(p, y, weights=counts[r][inverse]), abs=1e-12)
    assert resampled_auc(p, y, u, np.ones((1, 50), dtype=np.int64))[0] == pytest.approx(auc(p, y), abs=1e-12)


def test_bootstrap_is_reproducible_and_seeded():
    p_a, y, u = synthetic(seed=1)
    p_b, _, _ = synthetic(seed=2)
    one = paired_bootstrap(p_a, p_b, y, u, num_resamples=50, seed=3, metrics=["auc"])["auc"]
    two = paired_bootstrap(p_a, p_b, y, u, num_resamples=50, seed=3, metrics=["auc"])["auc"]
    other = paired_bootstrap(p_a, p_b, y, u, num_resamples=50, seed=4, metrics=["auc"])["auc"]
    np.testing.assert_array_equal(one.samples, two.samples)
    assert not np.array_equal(one.samples, other.samples)


def test_bootstrap_seed_mean_difference():
    p, y, u = synthetic(signal=1.5)
    rng = np.random.default_rng(0)
    noisy = lambda scale: np.clip(p + rng.normal(scale=scale, size=p.size), 0, 1)  # noqa: E731
    a = np.stack([noisy(0.05) for _ in range(3)])  # [S=3, N]
    b = np.stack([noisy(0.4) for _ in range(3)])
    out = paired_bootstrap(a, b, y, u, num_resamples=100)
    r = out["auc"]
    assert len(r.a_per_seed) == 3 and r.a_per_seed[1] == pytest.approx(auc(a[1], y))
    assert r.diff == pytest.approx(np.mean([auc(x, y) for x in a]) - np.mean([auc(x, y) for x in b]))
    assert r.seed_diffs == pytest.approx([auc(x, y) - auc(z, y) for x, z in zip(a, b)])
    assert r.seeds_agree and r.excludes_zero and r.diff > 0
    # Three copies of one seed give exactly the one-seed result: every seed sees the same user draw.
    single = paired_bootstrap(a[0], b[0], y, u, num_resamples=100)["auc"]
    tripled = paired_bootstrap(np.stack([a[0]] * 3), np.stack([b[0]] * 3), y, u, num_resamples=100)["auc"]
    np.testing.assert_allclose(tripled.samples, single.samples, rtol=0, atol=1e-14)
    # Different numbers of seeds: a seed-mean difference, with no per-seed pairing.
    unpaired = paired_bootstrap(a, b[:2], y, u, num_resamples=20)["auc"]
    assert unpaired.seed_diffs is None and unpaired.seeds_agree is None


def test_bootstrap_mask_and_undefined_point_estimate():
    p, y, u = synthetic(400, users=30)
    mask = np.arange(400) % 2 == 0
    masked = paired_bootstrap(p, p[::-1].copy(), y, u, mask=mask, num_resamples=30, metrics=["log_loss"])
    direct = paired_bootstrap(p[mask], p[::-1][mask], y[mask], u[mask], num_resamples=30, metrics=["log_loss"])
    np.testing.assert_array_equal(masked["log_loss"].samples, direct["log_loss"].samples)
    with pytest.raises(UndefinedMetricError, match="model A .*AUC is undefined"):
        paired_bootstrap([0.1, 0.2], [0.3, 0.4], [1, 1], [1, 2], num_resamples=5)
    with pytest.raises(ValueError, match="unknown"):
        paired_bootstrap(p, p, y, u, metrics=["accuracy"])


def test_bootstrap_drops_and_counts_undefined_resamples():
    # Two users: one all-positive, one all-negative. Any resample drawing only one of them has one class.
    out = paired_bootstrap([0.9, 0.8, 0.1], [0.7, 0.6, 0.4], [1, 1, 0], [1, 1, 2], num_resamples=200, metrics=["auc", "ne"])
    for r in out.values():
        assert 0 < r.num_valid < 200 and r.samples.size == r.num_valid and np.isfinite(r.samples).all()


# ---------------------------------------------------------------------------------------------------------------
# sklearn, when installed (not a dependency)
# ---------------------------------------------------------------------------------------------------------------


def test_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    p, y, u = synthetic(5000, users=400, ties=True)
    assert auc(p, y) == pytest.approx(metrics.roc_auc_score(y, p), abs=1e-12)
    w = np.random.default_rng(0).integers(0, 5, p.size)
    assert auc(p, y, weights=w) == pytest.approx(metrics.roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert log_loss(p, y) == pytest.approx(metrics.log_loss(y, np.clip(p, PROB_EPS, 1 - PROB_EPS)), abs=1e-12)
    num = den = 0.0
    for user in np.unique(u):
        sel = u == user
        if 0 < y[sel].sum() < sel.sum():
            num += sel.sum() * metrics.roc_auc_score(y[sel], p[sel])
            den += sel.sum()
    assert gauc(p, y, u)[0] == pytest.approx(num / den, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Average precision (PR-AUC)
# ---------------------------------------------------------------------------------------------------------------


def loop_average_precision(scores, labels, weights=None) -> float:
    """sum_k (R_k - R_{k-1}) * P_k over the distinct thresholds, descending, by explicit loops."""
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    w = np.ones_like(s) if weights is None else np.asarray(weights, float)
    total_pos = sum(wi * yi for wi, yi in zip(w, y))
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        tp = sum(wi * yi for si, wi, yi in zip(s, w, y) if si >= t)
        predicted = sum(wi for si, wi in zip(s, w) if si >= t)
        recall = tp / total_pos
        if predicted > 0:
            ap += (recall - previous_recall) * (tp / predicted)
        previous_recall = recall
    return ap


def test_average_precision_hand_computed():
    # thresholds 0.9 (P 1, R 1/2), 0.8 (P 1/2), 0.7 (P 2/3, R 1), 0.6: AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # tied scores are one threshold: 0.9 (P 0, R 0), 0.8 x2 (P 2/3, R 1): AP = 2/3
    assert average_precision([0.9, 0.8, 0.8, 0.3], [0, 1, 1, 0]) == pytest.approx(2 / 3)
    assert average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert average_precision([0.9, 0.1], [1, 0]) == 1.0
    # a weight of 2 is the example twice: 0.9 (P 1, R 2/3), 0.8 (P 2/3), 0.7 (P 3/4, R 1)
    assert average_precision([0.9, 0.8, 0.7], [1, 0, 1], [2, 1, 1]) == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_equals_a_loop_over_thresholds(seed):
    rng = np.random.default_rng(seed)
    n = 200
    s = np.round(rng.random(n), 1 + seed % 2)  # many ties
    y = (rng.random(n) < 0.25).astype(float)
    w = rng.integers(0, 4, n).astype(float)
    assert average_precision(s, y) == pytest.approx(loop_average_precision(s, y), abs=1e-12)
    assert average_precision(s, y, w) == pytest.approx(loop_average_precision(s, y, w), abs=1e-12)
    assert average_precision(torch.tensor(s), torch.tensor(y)) == pytest.approx(loop_average_precision(s, y))


def test_average_precision_refuses_bad_or_undefined_input():
    with pytest.raises(UndefinedMetricError, match="without a positive"):
        average_precision([0.4, 0.3], [0, 0])
    with pytest.raises(UndefinedMetricError, match="without a positive"):
        average_precision([0.4, 0.3], [1, 0], [0, 1])  # the only positive weighs nothing
    with pytest.raises(ValueError, match="scores: 1 value"):
        average_precision([0.5, np.nan], [1, 0])
    with pytest.raises(ValueError, match="labels: must be 0 or 1"):
        average_precision([0.5, 0.4], [1, 2])
    with pytest.raises(ValueError, match="different lengths"):
        average_precision([0.5, 0.4], [1])
    with pytest.raises(ValueError, match="weights: must be non-negative"):
        average_precision([0.5, 0.4], [1, 0], [1, -1])
    with pytest.raises(ValueError, match="1-D"):
        average_precision([[0.5, 0.4]], [[1, 0]])


def test_resampled_average_precision_equals_the_resampled_data():
    p, y, u = synthetic(n=600, users=30, seed=3, ties=True)
    users = np.unique(u)
    assert len(users) == 30
    y = np.where(u == users[0], 0.0, y)  # the first user has no positive
    counts = bootstrap_user_counts(30, 6, seed=1)
    counts[0] = 0
    counts[0, 0] = 2  # a resample of that user alone has no positive: NaN
    got = resampled_average_precision(p, y, u, counts, chunk=4)
    for r in range(1, 6):
        rep = np.repeat(np.arange(len(p)), counts[r][np.searchsorted(users, u)])
        assert got[r] == pytest.approx(loop_average_precision(p[rep], y[rep]), abs=1e-9)
    assert math.isnan(got[0])
    with pytest.raises(ValueError, match=r"counts: expected \[R, 30\]"):
        resampled_average_precision(p, y, u, counts[:, :5])
    with pytest.raises(ValueError, match="non-negative integers"):
        resampled_average_precision(p, y, u, counts.astype(float))
    with pytest.raises(ValueError, match="chunk"):
        resampled_average_precision(p, y, u, counts, chunk=0)
