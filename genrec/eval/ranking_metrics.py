"""Metrics for ranking (per-candidate probability) models: AUC, GAUC, NE, log loss, calibration, PR-AUC, paired
bootstrap.

Every function takes flat per-example arrays (numpy arrays, torch tensors or sequences)::

    probs     [N]  float  predicted probability of the positive class, in [0, 1]
    labels    [N]  0/1    observed label (float or int; anything else is refused)
    user_ids  [N]  any    group of each example (GAUC groups, bootstrap resampling units)
    mask      [N]  bool   optional; True = evaluate this example (e.g. a real candidate whose label is known)

Multi-task arrays are ``[N, T]`` with the task names given separately; :func:`flatten_candidates` turns a
:class:`~genrec.data.ranking_batch.RankingBatch`-shaped model output (``[B, C, T]`` plus ``cand_mask``) into them.

Definitions (natural logarithms throughout):

* **AUC** -- ROC AUC, the probability that a random positive scores above a random negative, a tie counting one
  half (the Mann-Whitney U statistic divided by ``P * N``). Computed in O(n log n) from a sort, never from pairs.
* **GAUC** -- per-user AUC averaged over the users who have both a positive and a negative, each weighted by the
  user's number of evaluated examples (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate
  Prediction", KDD, section 6 "Metrics", with impressions as weights). This *weighted* form is the default (``"gauc"``); the
  unweighted mean over users is ``"gauc_unweighted"``. Users with a single class have no AUC and are left out;
  ``"gauc_users"`` says how many users were counted. DLRM-v3 groups by request rather than by user: pass a
  request id as ``user_ids`` to get that.
* **Log loss** -- mean binary cross-entropy. Probabilities are clipped into ``[eps, 1 - eps]`` with
  ``eps = 1e-7`` (:data:`PROB_EPS`): a float32 sigmoid cannot express ``1 - p`` finer than about 6e-8 anyway (it
  rounds to exactly 1.0 beyond logit ~17), so a tighter clip would only reward the float rounding of a saturated
  output. One confidently wrong example therefore costs at most ``-log(1e-7) = 16.1``.
* **NE** -- normalised entropy (He et al. 2014, "Practical Lessons from Predicting Clicks on Ads at Facebook",
  ADKDD, section 2.1): log loss divided by the entropy of the base rate,
  ``H(p) = -(p log p + (1 - p) log(1 - p))``. Predicting the base rate for every example gives NE = 1; lower is
  better. *Deliberate deviation*: the paper takes ``p`` from the training data; by default ``p`` here is the base
  rate of the *evaluated* labels (as torchrec's NE metric does), so NE does not depend on the training split.
  Pass ``base_rate=`` to use the training base rate instead.
* **Calibration** -- ``sum(probs) / sum(labels)``: expected over observed positives, i.e. the average predicted
  rate over the empirical rate (He et al. 2014, section 2.1); 1 is calibrated in aggregate, above 1 over-predicts.
* **PR-AUC** -- the area under the precision-recall curve as *average precision* (:func:`average_precision`),
  ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds in descending order (tied scores are one
  threshold), the step-wise estimator of scikit-learn's ``average_precision_score``; no trapezoidal interpolation,
  which over-estimates the area (Davis & Goadrich 2006, "The Relationship Between Precision-Recall and ROC
  Curves", ICML). Undefined without a positive. :func:`resampled_average_precision` gives it on user resamples.

Undefined values are never silently reported as numbers. The scalar functions (:func:`auc`, :func:`gauc`,
:func:`normalized_entropy`, :func:`calibration`) raise :class:`UndefinedMetricError` (a ``ValueError``) with the
reason: AUC with only one class present, GAUC when no user has both classes, NE when the base rate is 0 or 1,
calibration with no positive label. :func:`ranking_metrics` returns a complete report instead: an undefined metric
is ``nan`` and ``report["undefined"]`` maps its name to the reason. Malformed input (probabilities outside
[0, 1] or not finite, labels other than 0/1, mismatched lengths, a non-boolean mask, nothing left to evaluate)
raises ``ValueError`` naming the argument.

**Paired bootstrap over users** (:func:`paired_bootstrap`): two models' predictions on the same examples; each
resample draws users with replacement (all of a user's examples move together, so within-user correlation is kept)
and computes ``metric(A) - metric(B)``. The result is the point difference on the full data, the percentile
confidence interval (95% by default) of the resampled differences, and whether the interval excludes 0. A user
drawn ``k`` times is ``k`` users with identical examples, so every metric becomes a *weighted* metric with per-user
multiplicities as weights: log loss and NE reduce to per-user sums, GAUC to a weighted mean of fixed per-user AUCs,
and AUC to a weighted AUC over the scores sorted once (a cumulative sum of negative weights, read at each positive's
place, in exact integer arithmetic). Nothing is re-sorted per resample, and resamples are processed in vectorised
blocks of bounded memory; every resample's value equals the metric computed on the explicitly resampled data set
(each copy of a drawn user being a distinct user). The draws come from ``numpy.random.default_rng(seed)``:
:func:`bootstrap_user_counts` returns them. A resample where a metric is undefined for either model (e.g. only one
class drawn) is dropped from its interval and counted (``num_valid``).

**Several seeds** (``probs_a`` / ``probs_b`` of shape ``[S, N]``): the statistic is the *seed-mean* difference
``mean_s metric(A_s) - mean_s metric(B_s)``, and every resample applies the same user draw to all seeds of both
models. The interval therefore covers the evaluation-set sampling variability of the seed-averaged comparison; it
does not resample seeds (with 3-5 seeds a bootstrap over seeds is too coarse to mean anything). Training-seed
variability is reported alongside: each model's per-seed point values (``a_per_seed``, ``b_per_seed``) and, when
both models have the same number of seeds, the per-seed differences and whether they all share the sign of the
mean (``seeds_agree``). Three or more seeds per model are recommended; fewer are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROB_EPS = 1e-7  # log-loss clipping of probabilities into [PROB_EPS, 1 - PROB_EPS]; see the module docstring
BOOTSTRAP_METRICS = ("auc", "gauc", "ne", "log_loss")
_BLOCK_ELEMENTS = 1 << 21  # resamples per block are sized so a [block, N] float64 array stays near 16 MiB


class UndefinedMetricError(ValueError):
    """A metric has no value on these labels (e.g. AUC with a single class); the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------------------------


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name}: could not be read as a numeric array")
    return arr


def _check_probs(probs: Any, name: str = "probs") -> np.ndarray:
    p = _as_array(probs, name).astype(np.float64, copy=False)
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: {int((~np.isfinite(p)).sum())} value(s) are NaN or infinite")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"{name}: probabilities must lie in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}] "
            "(pass sigmoid(logits), not logits)"
        )
    return p


def _check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    s = _as_array(scores, name).astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: {int((~np.isfinite(s)).sum())} value(s) are NaN or infinite")
    return s


def _check_labels(labels: Any, name: str = "labels") -> np.ndarray:
    y = _as_array(labels, name)
    if y.dtype == bool:
        return y.astype(np.float64)
    y = y.astype(np.float64, copy=False)
    bad = ~((y == 0.0) | (y == 1.0))
    if bad.any():
        first = np.argwhere(bad)[0]
        where = tuple(int(i) for i in first)
        raise ValueError(
            f"{name}: must be 0 or 1, found {float(y[tuple(first)])!r} at index "
            f"{where[0] if len(where) == 1 else where} (mask out missing labels instead of encoding them)"
        )
    return y


def _check_mask(mask: Any, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    m = _as_array(mask, name)
    if m.dtype != bool:
        raise ValueError(f"{name}: must be boolean (True = evaluate), got dtype {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"{name}: shape {m.shape}, expected {shape}")
    return m


def _same_length(**arrays: np.ndarray) -> int:
    for name, a in arrays.items():
        if a.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array [N], got shape {a.shape}")
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays of different lengths: {lengths}")
    return next(iter(lengths.values()))


def _user_index(user_ids: Any, n: int) -> tuple[np.ndarray, int]:
    """(index 0..U-1 of each example's user [n], U)."""
    u = _as_array(user_ids, "user_ids")
    if u.ndim != 1 or u.shape[0] != n:
        raise ValueError(f"user_ids: shape {u.shape}, expected ({n},)")
    if np.issubdtype(u.dtype, np.floating) and not np.isfinite(u).all():
        raise ValueError(f"user_ids: {int((~np.isfinite(u)).sum())} id(s) are NaN or infinite")
    _, inverse = np.unique(u, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse, int(inverse.max()) + 1 if n else 0


def _describe_single_class(y: np.ndarray) -> str:
    if y.size == 0:
        return "there is no example"
    value = int(y[0])
    kind = "positives" if value == 1 else "negatives"
    return f"all {y.size:,} evaluated labels are {value} ({kind} only)"


# ----------------------------------------------------------------------------------------------------------------
# Scalar metrics
# ----------------------------------------------------------------------------------------------------------------


def _scored_examples(scores: Any, labels: Any, weights: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked (scores [N], 0/1 labels [N], non-negative weights [N], 1 when None) of a weighted binary metric."""
    s = _check_scores(scores)
    y = _check_labels(labels)
    _same_length(scores=s, labels=y)
    if weights is None:
        return s, y, np.ones_like(s)
    w = _check_scores(weights, "weights")
    _same_length(scores=s, weights=w)
    if (w < 0).any():
        raise ValueError("weights: must be non-negative")
    return s, y, w


def auc(scores: Any, labels: Any, weights: Any | None = None) -> float:
    """ROC AUC with ties counted one half, optionally with per-example non-negative weights.

    ``AUC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos * W_neg)``, computed in
    O(n log n): the negatives are sorted once, and each positive reads the cumulative negative weight strictly
    below its score and up to its score (their mean counts ties as one half). With unit weights this is the
    Mann-Whitney U statistic over ``P * N``. A weight of ``k`` is the same as repeating the example ``k`` times.

    Args:
        scores: [N] finite scores (probabilities or logits: only their order matters).
        labels: [N] 0/1 labels.
        weights: optional [N] non-negative weights.

    Raises:
        UndefinedMetricError: only one class present (or all weight on one class).
    """
    s, y, w = _scored_examples(scores, labels, weights)
    pos = y == 1.0
    neg_scores = s[~pos]
    order = np.argsort(neg_scores, kind="stable")
    neg_sorted = neg_scores[order]
    cum = np.concatenate(([0.0], np.cumsum(w[~pos][order])))  # [n_neg + 1] negative weight of the first k
    w_pos, w_neg = float(w[pos].sum()), float(cum[-1])
    if w_pos == 0.0 or w_neg == 0.0:
        if weights is None:
            raise UndefinedMetricError(f"AUC is undefined: {_describe_single_class(y)}")
        raise UndefinedMetricError("AUC is undefined: all the weight is on one class")
    below = cum[np.searchsorted(neg_sorted, s[pos], side="left")]  # negative weight with score < s_i
    upto = cum[np.searchsorted(neg_sorted, s[pos], side="right")]  # negative weight with score <= s_i
    return float((w[pos] * (below + upto)).sum() * 0.5 / (w_pos * w_neg))


@dataclass(frozen=True)
class _PerUser:
    """Per-user sufficient statistics of one model's predictions (U users, index 0..U-1)."""

    auc: np.ndarray  # [U] per-user AUC, NaN for single-class users
    count: np.ndarray  # [U] evaluated examples
    positives: np.ndarray  # [U] positive labels
    log_loss_sum: np.ndarray  # [U] sum of clipped per-example log losses


def _per_user_auc(scores: np.ndarray, labels: np.ndarray, uidx: np.ndarray, num_users: int) -> np.ndarray:
    """[U] AUC within each user (ties one half, via mid-ranks inside the user), NaN where the user has one class."""
    n = scores.shape[0]
    order = np.lexsort((scores, uidx))  # by user, then score
    su, ss, sy = uidx[order], scores[order], labels[order]
    new_group = np.ones(n, dtype=bool)  # a run of equal (user, score)
    new_group[1:] = (su[1:] != su[:-1]) | (ss[1:] != ss[:-1])
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    group_of = np.cumsum(new_group) - 1
    midrank = ((starts + ends + 1) * 0.5)[group_of]  # 1-based mid-rank in the whole sorted array
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = su[1:] != su[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    rank_in_user = midrank - user_start  # 1-based mid-rank within the user
    pos = np.bincount(su, weights=sy, minlength=num_users)
    cnt = np.bincount(su, minlength=num_users).astype(np.float64)
    negs = cnt - pos
    rank_sum = np.bincount(su, weights=rank_in_user * sy, minlength=num_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rank_sum - pos * (pos + 1) * 0.5) / (pos * negs)
    out[(pos == 0) | (negs == 0)] = np.nan
    return out


def _clipped_log_losses(p: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    q = np.clip(p, eps, 1.0 - eps)
    return -(y * np.log(q) + (1.0 - y) * np.log1p(-q))


def _per_user(p: np.ndarray, y: np.ndarray, uidx: np.ndarray, num_users: int, eps: float) -> _PerUser:
    return _PerUser(
        auc=_per_user_auc(p, y, uidx, num_users),
        count=np.bincount(uidx, minlength=num_users).astype(np.float64),
        positives=np.bincount(uidx, weights=y, minlength=num_users),
        log_loss_sum=np.bincount(uidx, weights=_clipped_log_losses(p, y, eps), minlength=num_users),
    )


def _gauc_from_users(per_user_auc: np.ndarray, count: np.ndarray, weighted: bool) -> tuple[float, int]:
    valid = ~np.isnan(per_user_auc)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UndefinedMetricError(
            f"GAUC is undefined: none of the {count.size:,} users has both a positive and a negative label"
        )
    w = count[valid] if weighted else np.ones(n_valid)
    return float((w * per_user_auc[valid]).sum() / w.sum()), n_valid


def gauc(scores: Any, labels: Any, user_ids: Any, weighted: bool = True) -> tuple[float, int]:
    """Group AUC: per-user AUC averaged over users who have both classes.

    Args:
        scores: [N] finite scores.
        labels: [N] 0/1 labels.
        user_ids: [N] group of each example (any sortable ids).
        weighted: True (default) weights each user by its number of examples (Zhou et al. 2018); False gives
            every counted user the same weight.

    Returns:
        (GAUC, number of users counted). Single-class users are left out of both.

    Raises:
        UndefinedMetricError: no user has both classes.
    """
    s = _check_scores(scores)
    y = _check_labels(labels)
    n = _same_length(scores=s, labels=y)
    if n == 0:
        raise ValueError("gauc: no examples")
    uidx, num_users = _user_index(user_ids, n)
    per_user = _per_user_auc(s, y, uidx, num_users)
    return _gauc_from_users(per_user, np.bincount(uidx, minlength=num_users).astype(np.float64), weighted)


def log_loss(probs: Any, labels: Any, eps: float = PROB_EPS) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped into ``[eps, 1 - eps]``."""
    p = _check_probs(probs)
    y = _check_labels(labels)
    n = _same_length(probs=p, labels=y)
    if n == 0:
        raise ValueError("log_loss: no examples")
    return float(_clipped_log_losses(p, y, eps).mean())


def binary_entropy(p: float) -> float:
    """``H(p) = -(p log p + (1 - p) log(1 - p))`` in nats; 0 at p in {0, 1}."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binary_entropy: p must lie in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log1p(-p))


def normalized_entropy(probs: Any, labels: Any, base_rate: float | None = None, eps: float = PROB_EPS) -> float:
    """NE (He et al. 2014): log loss divided by the entropy of the base rate.

    Args:
        probs: [N] probabilities.
        labels: [N] 0/1 labels.
        base_rate: the base rate whose entropy normalises; default the mean of ``labels`` (see the module
            docstring for this deviation from the paper, which uses the training base rate).
        eps: log-loss clipping.

    Raises:
        UndefinedMetricError: the base rate is 0 or 1 (zero entropy).
    """
    y = _check_labels(labels)
    ll = log_loss(probs, y, eps)
    p = float(y.mean()) if base_rate is None else float(base_rate)
    h = binary_entropy(p)
    if h == 0.0:
        what = _describe_single_class(y) if base_rate is None else f"base_rate={base_rate}"
        raise UndefinedMetricError(f"NE is undefined: the base rate is {p:g} (zero entropy): {what}")
    return ll / h


def calibration(probs: Any, labels: Any) -> float:
    """``sum(probs) / sum(labels)``: 1 = calibrated in aggregate, > 1 over-predicts.

    Raises:
        UndefinedMetricError: no positive label.
    """
    p = _check_probs(probs)
    y = _check_labels(labels)
    _same_length(probs=p, labels=y)
    if y.sum() == 0:
        raise UndefinedMetricError(f"calibration is undefined: no positive label among {y.size:,} examples")
    return float(p.sum() / y.sum())


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def ranking_metrics(
    probs: Any,
    labels: Any,
    user_ids: Any,
    mask: Any | None = None,
    *,
    base_rate: float | None = None,
    eps: float = PROB_EPS,
) -> dict[str, Any]:
    """Every ranking metric of one task, as a report that is always complete.

    Args:
        probs: [N] probabilities in [0, 1].
        labels: [N] 0/1 labels.
        user_ids: [N] group of each example (GAUC).
        mask: optional [N] bool, True = evaluate the example.
        base_rate: NE's base rate (default: the evaluated labels' mean).
        eps: log-loss clipping.

    Returns:
        ``{"auc", "gauc" (example-weighted), "gauc_unweighted", "ne", "log_loss", "calibration"}`` as floats,
        ``"gauc_users"`` (users counted by GAUC), ``"users"`` (users evaluated), ``"examples"``, ``"positives"``,
        ``"base_rate"`` and ``"undefined"``: ``{metric: reason}`` for each metric reported as ``nan``.
    """
    p = _check_probs(probs)
    y = _check_labels(labels)
    n = _same_length(probs=p, labels=y)
    u = _as_array(user_ids, "user_ids")
    _same_length(probs=p, user_ids=u)
    if mask is not None:
        m = _check_mask(mask, (n,))
        p, y, u = p[m], y[m], u[m]
    if p.size == 0:
        raise ValueError("ranking_metrics: no example to evaluate (empty input or an all-False mask)")
    uidx, num_users = _user_index(u, p.size)
    per_user_auc = _per_user_auc(p, y, uidx, num_users)
    counts = np.bincount(uidx, minlength=num_users).astype(np.float64)
    undefined: dict[str, str] = {}

    def attempt(name: str, fn) -> Any:
        try:
            return fn()
        except UndefinedMetricError as err:
            undefined[name] = str(err)
            return None

    g = attempt("gauc", lambda: _gauc_from_users(per_user_auc, counts, weighted=True))
    gu = attempt("gauc_unweighted", lambda: _gauc_from_users(per_user_auc, counts, weighted=False))
    report: dict[str, Any] = {
        "auc": attempt("auc", lambda: auc(p, y)),
        "gauc": g[0] if g else None,
        "gauc_unweighted": gu[0] if gu else None,
        "ne": attempt("ne", lambda: normalized_entropy(p, y, base_rate=base_rate, eps=eps)),
        "log_loss": log_loss(p, y, eps),
        "calibration": attempt("calibration", lambda: calibration(p, y)),
    }
    report = {k: (math.nan if v is None else v) for k, v in report.items()}
    report.update(
        gauc_users=g[1] if g else 0,
        users=num_users,
        examples=int(p.size),
        positives=int(y.sum()),
        base_rate=float(y.mean()),
        undefined=undefined,
    )
    return report


def multitask_ranking_metrics(
    probs: Any,
    labels: Any,
    user_ids: Any,
    tasks: Sequence[str],
    mask: Any | None = None,
    *,
    base_rates: Sequence[float] | None = None,
    eps: float = PROB_EPS,
) -> dict[str, dict[str, Any]]:
    """:func:`ranking_metrics` for each task of ``[N, T]`` arrays.

    Args:
        probs: [N, T] probabilities.
        labels: [N, T] 0/1 labels.
        user_ids: [N] group of each example.
        tasks: T task names, in the order of the last axis.
        mask: optional [N] bool (every task) or [N, T] bool (per task, e.g. a label known for some tasks only).
        base_rates: optional T base rates for NE.

    Returns:
        ``{task: report}``. A malformed input raises ``ValueError`` naming the task.
    """
    p = _as_array(probs, "probs")
    y = _as_array(labels, "labels")
    if p.ndim != 2:
        raise ValueError(f"probs: expected [N, T], got shape {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"labels: shape {y.shape}, expected {p.shape} (the shape of probs)")
    n, t = p.shape
    tasks = tuple(tasks)
    if len(tasks) != t:
        raise ValueError(f"tasks: {len(tasks)} names for {t} columns")
    if len(set(tasks)) != t:
        raise ValueError(f"tasks: duplicate names in {tasks}")
    if base_rates is not None and len(base_rates) != t:
        raise ValueError(f"base_rates: {len(base_rates)} values for {t} tasks")
    m = None
    if mask is not None:
        m = _as_array(mask, "mask")
        if m.ndim == 1:
            m = _check_mask(m, (n,))[:, None].repeat(t, axis=1)
        else:
            m = _check_mask(m, (n, t))
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(tasks):
        try:
            out[name] = ranking_metrics(
                p[:, j],
                y[:, j],
                user_ids,
                None if m is None else m[:, j],
                base_rate=None if base_rates is None else base_rates[j],
                eps=eps,
            )
        except ValueError as err:
            raise ValueError(f"task {name!r}: {err}") from err
    return out


def flatten_candidates(
    probs: Any, labels: Any, cand_mask: Any, user_ids: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RankingBatch-shaped outputs -> flat per-candidate arrays for the metrics.

    Args:
        probs: [B, C, T] predicted probabilities.
        labels: [B, C, T] labels (``RankingBatch.labels``).
        cand_mask: [B, C] bool, real candidates (``RankingBatch.cand_mask``).
        user_ids: [B] user ids (``RankingBatch.user_ids``; 0 = unknown user).

    Returns:
        (probs [N, T], labels [N, T], user_ids [N]) over the N real candidates, row-major. Rows of the unknown
        user 0 are not one user: each such row becomes its own group (id ``-(row + 1)``), so GAUC and the bootstrap
        never merge different unknown users into one.
    """
    p = _as_array(probs, "probs")
    y = _as_array(labels, "labels")
    cm = _as_array(cand_mask, "cand_mask")
    u = _as_array(user_ids, "user_ids").astype(np.int64)
    if p.ndim != 3:
        raise ValueError(f"probs: expected [B, C, T], got shape {p.shape}")
    b, c, _ = p.shape
    if y.shape != p.shape:
        raise ValueError(f"labels: shape {y.shape}, expected {p.shape}")
    cm = _check_mask(cm, (b, c), "cand_mask")
    if u.shape != (b,):
        raise ValueError(f"user_ids: shape {u.shape}, expected ({b},)")
    groups = np.where(u == 0, -(np.arange(b) + 1), u)
    return p[cm], y[cm], np.broadcast_to(groups[:, None], (b, c))[cm]


# ----------------------------------------------------------------------------------------------------------------
# Paired bootstrap over users
# ----------------------------------------------------------------------------------------------------------------


def _count_blocks(num_users: int, num_resamples: int, seed: int, block: int) -> Iterator[np.ndarray]:
    """Blocks of [r, U] int64 user multiplicities from one seeded stream; row k is the same whatever ``block`` is.

    Resample k is row k of a stream of uniform doubles (one 64-bit draw each, no buffering), mapped to user
    ``floor(x * U)``; so how resamples are grouped into blocks (a memory bound) never changes which users a
    resample holds. (The mapping's bias is below U / 2**53.)
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < num_resamples:
        r = min(block, num_resamples - done)
        draws = np.minimum((rng.random((r, num_users)) * num_users).astype(np.int64), num_users - 1)  # [r, U]
        flat = (draws + np.arange(r)[:, None] * num_users).ravel()
        yield np.bincount(flat, minlength=r * num_users).reshape(r, num_users)
        done += r


def _block_size(num_examples: int, num_users: int) -> int:
    return max(1, min(256, _BLOCK_ELEMENTS // max(num_examples, num_users, 1)))


def bootstrap_user_counts(num_users: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """[R, U] int64 multiplicity of each user in each resample, exactly as :func:`paired_bootstrap` draws them.

    Column ``k`` is the ``k``-th smallest distinct user id among the evaluated examples.
    """
    if num_users < 1 or num_resamples < 1:
        raise ValueError("bootstrap_user_counts: num_users and num_resamples must be >= 1")
    return np.concatenate(list(_count_blocks(num_users, num_resamples, seed, _block_size(num_users, num_users))))


class _ResampledAUC:
    """AUC of one model's scores under per-user integer weights, for many weight vectors at once, exactly.

    Prepared once (O(n log n)): the negatives sorted by score with their users, and for each positive the number
    of negatives scoring strictly below it (``lo``) and at most it (``hi``; differs only where a positive ties a
    negative). For a block of multiplicities ``counts_t [U, r]`` (users by resamples), the AUC of each column is::

        cum[k]  = total multiplicity of the first k sorted negatives                   # [n_neg + 1, r]
        2 * num = sum_i w_i (2 cum[lo_i])  +  sum_{i tied} w_i (cum[hi_i] - cum[lo_i])  # i over positives
        AUC     = 2 * num / (2 * W_pos * W_neg)

    which is the AUC of the data with every user's examples repeated by its multiplicity. Everything up to the
    final division is integer arithmetic (int32 gathers and prefix sums where they cannot overflow, int64 sums),
    so the value is exact, and the users-by-resamples layout makes every gather a contiguous row copy.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, uidx: np.ndarray, count: np.ndarray):
        pos = labels == 1.0
        neg_scores = scores[~pos]
        order = np.argsort(neg_scores, kind="stable")
        neg_sorted = neg_scores[order]
        pos_order = np.argsort(scores[pos], kind="stable")  # positives in score order: cum is read front to back
        pos_scores = scores[pos][pos_order]
        self.neg_users = uidx[~pos][order]  # [n_neg]
        self.pos_users = uidx[pos][pos_order]  # [n_pos]
        self.lo = np.searchsorted(neg_sorted, pos_scores, side="left")  # [n_pos]
        hi = np.searchsorted(neg_sorted, pos_scores, side="right")  # [n_pos]
        self.tied = np.flatnonzero(hi != self.lo)  # positives that tie at least one negative
        self.tied_lo, self.tied_hi, self.tied_users = self.lo[self.tied], hi[self.tied], self.pos_users[self.tied]
        # A resample's total multiplicity-weighted count is at most U * (largest user); int32 if that fits.
        bound = count.size * (count.max() if count.size else 0)
        self.dtype = np.int32 if bound < 2**31 - 1 else np.int64

    def __call__(self, counts_t: np.ndarray) -> np.ndarray:
        """counts_t: [U, r] multiplicities (``self.dtype``) -> [r] AUC, NaN where a resample has one class."""
        r = counts_t.shape[1]
        cum = np.zeros((self.neg_users.size + 1, r), dtype=self.dtype)
        np.cumsum(counts_t[self.neg_users], axis=0, out=cum[1:])  # [n_neg + 1, r]
        w_pos = counts_t[self.pos_users]  # [n_pos, r]
        num2 = 2 * np.einsum("pr,pr->r", w_pos, cum[self.lo], dtype=np.int64)  # [r]
        if self.tied.size:
            gap = cum[self.tied_hi].astype(np.int64) - cum[self.tied_lo]  # [n_tied, r] tied negatives
            num2 += np.einsum("pr,pr->r", counts_t[self.tied_users], gap, dtype=np.int64)
        den2 = 2 * w_pos.sum(axis=0, dtype=np.int64) * cum[-1].astype(np.int64)  # [r]
        out = np.full(r, np.nan)
        ok = den2 > 0
        out[ok] = num2[ok] / den2[ok]
        return out


def resampled_auc(scores: Any, labels: Any, user_ids: Any, counts: Any) -> np.ndarray:
    """[R] AUC of ``scores`` on each resample, given ``counts [R, U]`` multiplicities of the sorted unique users.

    Column ``k`` of ``counts`` is the ``k``-th smallest distinct user id. NaN where a resample has one class.
    """
    s = _check_scores(scores)
    y = _check_labels(labels)
    n = _same_length(scores=s, labels=y)
    uidx, num_users = _user_index(user_ids, n)
    c = _as_array(counts, "counts")
    if c.ndim != 2 or c.shape[1] != num_users:
        raise ValueError(f"counts: expected [R, {num_users}], got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
        raise ValueError("counts: must be non-negative integers (user multiplicities)")
    f = _ResampledAUC(s, y, uidx, np.bincount(uidx, minlength=num_users))
    return f(np.ascontiguousarray(c.T, dtype=f.dtype))


def average_precision(scores: Any, labels: Any, weights: Any | None = None) -> float:
    """PR-AUC as average precision, ``AP = sum_k (R_k - R_{k-1}) * P_k`` over the distinct thresholds (see the module
    docstring), optionally with per-example non-negative weights (a weight of ``k`` is the same as repeating the
    example ``k`` times).

    Args:
        scores: [N] finite scores (probabilities or logits: only their order matters).
        labels: [N] 0/1 labels.
        weights: optional [N] non-negative weights.

    Raises:
        UndefinedMetricError: no positive label (or all positive weight zero): recall is undefined.
    """
    s, y, w = _scored_examples(scores, labels, weights)
    if not (w * y).sum() > 0:
        raise UndefinedMetricError("average precision is undefined without a positive label (recall needs one)")
    return float(_ap_rows(s, y, w[None, :])[0])


def _ap_rows(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[r] average precision of scores s [n], labels y [n] under r weight rows w [r, n]; NaN without a positive."""
    order = np.argsort(-s, kind="stable")  # O(n) when s is already sorted descending
    ss = s[order]
    ends = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])  # last position of each distinct score (a threshold)
    ws = w[:, order]  # [r, n]
    ctp = np.cumsum(ws * y[order], axis=1)[:, ends]  # [r, G] weighted true positives at each threshold
    call = np.cumsum(ws, axis=1)[:, ends]  # [r, G] weighted predicted positives
    tp = np.diff(ctp, axis=1, prepend=0.0)  # [r, G] positives gained at each threshold (recall steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(call > 0, ctp / np.where(call > 0, call, 1.0), 0.0)
        return (tp * precision).sum(axis=1) / ctp[:, -1]


def resampled_average_precision(scores: Any, labels: Any, user_ids: Any, counts: Any, chunk: int = 64) -> np.ndarray:
    """[R] average precision of ``scores`` on each resample, given ``counts [R, U]`` multiplicities of the sorted
    unique users (as :func:`bootstrap_user_counts` draws them): each equals :func:`average_precision` on the
    explicitly resampled data. NaN where a resample has no positive. ``chunk``: resamples per block (memory)."""
    s = _check_scores(scores)
    y = _check_labels(labels)
    n = _same_length(scores=s, labels=y)
    uidx, num_users = _user_index(user_ids, n)
    c = _as_array(counts, "counts")
    if c.ndim != 2 or c.shape[1] != num_users:
        raise ValueError(f"counts: expected [R, {num_users}], got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
        raise ValueError("counts: must be non-negative integers (user multiplicities)")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk: must be a positive integer, got {chunk!r}")
    return _resampled_ap(s, y, uidx, c, int(chunk))


def _resampled_ap(s: np.ndarray, y: np.ndarray, uidx: np.ndarray, counts: np.ndarray, chunk: int,
                  matrix_limit: int = 50_000_000) -> np.ndarray:  # fmt: skip
    """[R] average precision under per-user multiplicities ``counts [R, U]``, exactly as :func:`_ap_rows` on the
    per-example weights ``counts[:, uidx]``, but in O(P * U) memory and one matrix product per block of resamples.

    With examples sorted by descending score and ``e_i`` the last position of positive i's tie group (its
    threshold), precision at i under weights is ``sum_u c_u * A[i, u] / sum_u c_u * B[i, u]`` where ``B[i, u]``
    counts user u's examples at positions ``<= e_i`` and ``A[i, u]`` its positives there; AP = sum_i c_{u_i} *
    precision_i / sum_i c_{u_i}. When P * U exceeds ``matrix_limit`` the per-example form runs instead, ``chunk``
    resamples at a time.
    """
    U, P = counts.shape[1], int(y.sum())
    if P == 0:
        return np.full(counts.shape[0], np.nan)
    if P * U > matrix_limit:
        return np.concatenate([_ap_rows(s, y, counts[r:r + chunk][:, uidx].astype(np.float64))
                               for r in range(0, counts.shape[0], chunk)])  # fmt: skip
    order = np.argsort(-s, kind="stable")
    ss, ys, us = s[order], y[order], uidx[order]
    new = np.r_[True, ss[1:] != ss[:-1]]
    group_end = np.flatnonzero(np.r_[new[1:], True])[np.cumsum(new) - 1]  # [n] last position of each one's group
    pos = np.flatnonzero(ys == 1)  # [P] sorted positions of the positives
    e = group_end[pos]  # [P] non-decreasing thresholds
    block = np.searchsorted(e, np.arange(ss.size), side="left")  # [n] first positive whose threshold covers j
    B = np.bincount(block * U + us, minlength=(P + 1) * U).reshape(P + 1, U)[:P].cumsum(0).astype(np.float32)
    A = np.bincount(block[pos] * U + us[pos], minlength=(P + 1) * U).reshape(P + 1, U)[:P].cumsum(0)
    A = A.astype(np.float32)
    out = []
    for r in range(0, counts.shape[0], max(chunk, 64)):
        c = counts[r:r + max(chunk, 64)].T.astype(np.float32)  # [U, r]
        w = c[us[pos]].astype(np.float64)  # [P, r] multiplicity of each positive
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = (A @ c).astype(np.float64) / (B @ c).astype(np.float64)  # [P, r]
            out.append(np.where(w > 0, w * prec, 0.0).sum(0) / w.sum(0))
    return np.concatenate(out)


@dataclass(frozen=True)
class BootstrapDiff:
    """``metric(A) - metric(B)`` with its paired user-bootstrap percentile interval.

    For AUC and GAUC a positive difference means A is better; for NE and log loss a negative one does.
    """

    metric: str
    diff: float  # point difference on the full evaluation data (seed means when several seeds)
    ci_low: float
    ci_high: float
    confidence: float
    excludes_zero: bool  # the interval lies strictly on one side of 0
    num_resamples: int
    num_valid: int  # resamples where the metric was defined for both models (the rest are dropped, e.g. 1 class)
    num_users: int
    a_per_seed: tuple[float, ...]
    b_per_seed: tuple[float, ...]
    seed_diffs: tuple[float, ...] | None  # per-seed differences when A and B have the same number of seeds
    seeds_agree: bool | None  # every per-seed difference has the sign of the mean (None: unpaired seeds)
    samples: np.ndarray = field(repr=False, compare=False)  # [num_valid] resampled differences


def _as_seeds(probs: Any, n: int, name: str) -> np.ndarray:
    p = _check_probs(probs, name)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != n:
        raise ValueError(f"{name}: expected [N] or [S, N] with N={n}, got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError(f"{name}: no seed")
    return p


def paired_bootstrap(
    probs_a: Any,
    probs_b: Any,
    labels: Any,
    user_ids: Any,
    mask: Any | None = None,
    *,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
    gauc_weighted: bool = True,
    eps: float = PROB_EPS,
) -> dict[str, BootstrapDiff]:
    """Paired bootstrap over users of ``metric(A) - metric(B)`` for AUC, GAUC, NE and log loss.

    Args:
        probs_a: [N] or [S_a, N] model A's probabilities (one row per training seed).
        probs_b: [N] or [S_b, N] model B's probabilities on the same examples.
        labels: [N] 0/1 labels.
        user_ids: [N] resampling unit of each example.
        mask: optional [N] bool, True = evaluate.
        num_resamples: bootstrap resamples R.
        seed: seed of the resampling stream (same seed, same resamples).
        confidence: central percentile interval, e.g. 0.95 -> the 2.5th and 97.5th percentiles.
        metrics: a subset of ``("auc", "gauc", "ne", "log_loss")``.
        gauc_weighted: GAUC weighted by user examples (default) or not.
        eps: log-loss clipping.

    Returns:
        ``{metric: BootstrapDiff}``.

    Raises:
        UndefinedMetricError: a metric is undefined on the full data for one of the models.
    """
    unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; choose from {BOOTSTRAP_METRICS}")
    if not metrics:
        raise ValueError("metrics: empty")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    y = _check_labels(labels)
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array [N], got shape {y.shape}")
    n = y.shape[0]
    pa, pb = _as_seeds(probs_a, n, "probs_a"), _as_seeds(probs_b, n, "probs_b")
    u = _as_array(user_ids, "user_ids")
    _same_length(labels=y, user_ids=u)
    if mask is not None:
        m = _check_mask(mask, (n,))
        y, u, pa, pb = y[m], u[m], pa[:, m], pb[:, m]
    if y.size == 0:
        raise ValueError("paired_bootstrap: no example to evaluate (empty input or an all-False mask)")
    uidx, num_users = _user_index(u, y.size)
    models = [("A", s, pa[s]) for s in range(pa.shape[0])] + [("B", s, pb[s]) for s in range(pb.shape[0])]
    per_user = [_per_user(p, y, uidx, num_users, eps) for _, _, p in models]
    count, positives = per_user[0].count, per_user[0].positives

    # Point values on the full data, per model and seed.
    points: dict[str, list[float]] = {m: [] for m in metrics}
    for (name, s, p), pu in zip(models, per_user):
        try:
            for metric in metrics:
                if metric == "auc":
                    points[metric].append(auc(p, y))
                elif metric == "gauc":
                    points[metric].append(_gauc_from_users(pu.auc, count, gauc_weighted)[0])
                elif metric == "ne":
                    points[metric].append(normalized_entropy(p, y, eps=eps))
                else:
                    points[metric].append(float(pu.log_loss_sum.sum() / pu.count.sum()))
        except UndefinedMetricError as err:
            raise UndefinedMetricError(f"model {name} (seed row {s}): {err}") from err

    # Resampled values: [R, model] per metric, block by block.
    aucs = [_ResampledAUC(p, y, uidx, count) for _, _, p in models] if "auc" in metrics else []
    gauc_terms = []  # per model: ([U] weight * AUC with NaN -> 0, [U] weight of counted users)
    for pu in per_user:
        valid = ~np.isnan(pu.auc)
        w = np.where(valid, count if gauc_weighted else 1.0, 0.0)
        gauc_terms.append((np.where(valid, w * np.nan_to_num(pu.auc), 0.0), w))
    ll_sums = np.stack([pu.log_loss_sum for pu in per_user], axis=1)  # [U, models]
    values: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for int_counts in _count_blocks(num_users, num_resamples, seed, _block_size(y.size, num_users)):
        counts = int_counts.astype(np.float64)  # [r, U]
        if aucs:
            counts_t = np.ascontiguousarray(int_counts.T, dtype=aucs[0].dtype)  # [U, r]
        with np.errstate(invalid="ignore", divide="ignore"):
            n_r = counts @ count  # [r] examples in each resample
            ll = (counts @ ll_sums) / n_r[:, None]  # [r, models]
            if "auc" in metrics:
                values["auc"].append(np.stack([f(counts_t) for f in aucs], axis=1))
            if "gauc" in metrics:
                values["gauc"].append(np.stack([(counts @ a) / (counts @ w) for a, w in gauc_terms], axis=1))
            if "ne" in metrics:
                rate = (counts @ positives) / n_r  # [r]
                h = -(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate))  # NaN at rate 0 or 1
                values["ne"].append(ll / h[:, None])
            if "log_loss" in metrics:
                values["log_loss"].append(ll)

    na = pa.shape[0]
    alpha = (1.0 - confidence) / 2.0
    results: dict[str, BootstrapDiff] = {}
    for metric in metrics:
        v = np.concatenate(values[metric])  # [R, models]
        diffs = v[:, :na].mean(axis=1) - v[:, na:].mean(axis=1)  # [R]; NaN if undefined for any model
        diffs = diffs[np.isfinite(diffs)]
        a_pts, b_pts = tuple(points[metric][:na]), tuple(points[metric][na:])
        point = float(np.mean(a_pts) - np.mean(b_pts))
        if diffs.size:
            lo, hi = (float(x) for x in np.quantile(diffs, [alpha, 1.0 - alpha]))
        else:
            lo = hi = math.nan
        seed_diffs = seeds_agree = None
        if len(a_pts) == len(b_pts):
            seed_diffs = tuple(float(a - b) for a, b in zip(a_pts, b_pts))
            seeds_agree = bool(all(np.sign(d) == np.sign(point) for d in seed_diffs))
        results[metric] = BootstrapDiff(
            metric=metric,
            diff=point,
            ci_low=lo,
            ci_high=hi,
            confidence=confidence,
            excludes_zero=bool(lo > 0.0 or hi < 0.0),
            num_resamples=num_resamples,
            num_valid=int(diffs.size),
            num_users=num_users,
            a_per_seed=a_pts,
            b_per_seed=b_pts,
            seed_diffs=seed_diffs,
            seeds_agree=seeds_agree,
            samples=diffs,
        )
    return results
