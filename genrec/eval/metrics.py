"""Ranking metrics for next-item prediction (HR@k, NDCG@k, MRR) with pessimistic ties.

Conventions: item ids are ``1..num_items``; column 0 of every score / mask tensor is padding
and never a candidate.  A batch of scores has shape ``[B, C]`` with ``C = num_items + 1``.

Typical use::

    acc = RankAccumulator()
    for batch in loader:
        scores = model(batch)                                        # [B, C]
        acc.add(target_ranks(scores, batch.targets, exclude=batch.history))
    print(protocol.describe(), acc.compute(protocol))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from genrec.eval.ranking_metrics import BootstrapDiff, bootstrap_user_counts

if TYPE_CHECKING:  # pragma: no cover
    from genrec.eval.protocol import EvalProtocol


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based pessimistic rank of each target among its candidates.

    rank = number of candidates whose score is >= the target's score (the target counts itself).
    A NaN score on another candidate counts as beating the target; a NaN target score gets the
    worst rank (the number of candidates).

    Args:
        scores: [B, C] float scores; column 0 (padding) is ignored. Not modified.
        targets: [B] long target item ids in ``1..C-1``.
        exclude: optional [B, L] long item ids to remove from the candidates (e.g. the history),
            right/left padded with 0. The target is never removed, even if listed.
        candidate_mask: optional [B, C] bool, True where an item is a candidate (sampled
            protocol). Combined with ``exclude``; the target is always a candidate.

    Returns:
        [B] long ranks, each in ``1..#candidates``.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, C], got shape {tuple(scores.shape)}")
    batch, num_cols = scores.shape
    device = scores.device
    targets = torch.as_tensor(targets, device=device).long().reshape(-1)
    if targets.shape[0] != batch:
        raise ValueError(f"targets has {targets.shape[0]} rows, scores has {batch}")
    if batch and (int(targets.min()) < 1 or int(targets.max()) >= num_cols):
        raise ValueError(f"targets must lie in 1..{num_cols - 1} (0 is padding)")

    # Candidate mask: everything but padding, restricted by candidate_mask, minus exclusions.
    if candidate_mask is not None:
        if candidate_mask.shape != scores.shape:
            raise ValueError(
                f"candidate_mask shape {tuple(candidate_mask.shape)} != scores shape "
                f"{tuple(scores.shape)}"
            )
        mask = candidate_mask.to(device=device, dtype=torch.bool).clone()
    else:
        mask = torch.ones(batch, num_cols, dtype=torch.bool, device=device)
    if exclude is not None:
        exclude = torch.as_tensor(exclude, device=device).long()
        if exclude.ndim != 2 or exclude.shape[0] != batch:
            raise ValueError(f"exclude must be [B, L] with B={batch}, got {tuple(exclude.shape)}")
        if exclude.numel() and (int(exclude.min()) < 0 or int(exclude.max()) >= num_cols):
            raise ValueError(f"exclude ids must lie in 0..{num_cols - 1}")
        mask.scatter_(1, exclude, False)
    mask[:, 0] = False
    rows = torch.arange(batch, device=device)
    mask[rows, targets] = True

    target_scores = scores[rows, targets].unsqueeze(1)  # [B, 1]
    beats = scores >= target_scores  # new tensor; `scores` is untouched
    beats |= torch.isnan(scores)
    beats &= mask
    ranks = beats.sum(dim=1)
    worst = mask.sum(dim=1)
    return torch.where(torch.isnan(target_scores.squeeze(1)), worst, ranks).long()


def metrics_from_ranks(
    ranks: torch.Tensor | np.ndarray | Sequence[int],
    hr_ks: Iterable[int],
    ndcg_ks: Iterable[int],
) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from 1-based ranks.

    HR@k = mean[rank <= k]; NDCG@k = mean[1/log2(rank+1) if rank <= k else 0] (one relevant
    item, so the ideal DCG is 1); MRR = mean[1/rank] (uncapped).

    Args:
        ranks: [N] ranks >= 1.
        hr_ks, ndcg_ks: cut-offs.

    Returns:
        Dict ordered ``HR@k`` (ascending k), ``NDCG@k`` (ascending k), ``MRR``, ``count`` (int).
    """
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("no ranks to compute metrics from")
    if np.isnan(r).any() or r.min() < 1:
        raise ValueError("ranks must be >= 1 (1-based)")
    out: dict[str, float] = {}
    for k in sorted(hr_ks):
        out[f"HR@{k}"] = float(np.mean(r <= k))
    gain = 1.0 / np.log2(r + 1.0)
    for k in sorted(ndcg_ks):
        out[f"NDCG@{k}"] = float(np.mean(np.where(r <= k, gain, 0.0)))
    out["MRR"] = float(np.mean(1.0 / r))
    out["count"] = int(r.size)
    return out


class RankAccumulator:
    """Collects target ranks batch by batch and turns them into metrics at the end."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []

    def add(self, ranks: torch.Tensor | np.ndarray) -> None:
        """Append a batch of ranks, [B] ints >= 1 (copied to CPU)."""
        if isinstance(ranks, torch.Tensor):
            ranks = ranks.detach().cpu().numpy()
        arr = np.asarray(ranks, dtype=np.int64).reshape(-1).copy()
        if arr.size and arr.min() < 1:
            raise ValueError("ranks must be >= 1 (1-based)")
        self._chunks.append(arr)

    def __len__(self) -> int:
        return int(sum(c.size for c in self._chunks))

    @property
    def ranks(self) -> np.ndarray:
        """[N] all ranks added so far, in order."""
        if not self._chunks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self._chunks)

    def reset(self) -> None:
        self._chunks.clear()

    def compute(self, protocol: EvalProtocol) -> dict[str, float]:
        """Metrics at the protocol's cut-offs (see :func:`metrics_from_ranks`)."""
        return metrics_from_ranks(self.ranks, protocol.hr_ks, protocol.ndcg_ks)


def sample_candidates(
    histories: Sequence[np.ndarray],
    targets: torch.Tensor | np.ndarray | Sequence[int],
    num_items: int,
    num_negatives: int,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Candidate mask of the sampled protocol: the target + ``num_negatives`` negatives.

    Negatives are drawn uniformly without replacement from the items ``1..num_items`` that
    the user never interacted with (anywhere in ``histories[i]``, which is the whole sequence
    including the target). Rows consume ``rng`` in order, so for a fixed user order the result
    does not depend on how users are batched.

    Args:
        histories: B arrays of item ids — whole user sequences, target included.
        targets: [B] target ids.
        num_items: catalogue size; ids are ``1..num_items``.
        num_negatives: negatives per user.
        rng: the seeded generator (see :meth:`EvalProtocol.rng`).

    Returns:
        [B, num_items + 1] bool mask, exactly ``num_negatives + 1`` True per row, column 0 False.

    Raises:
        ValueError: if a user has fewer than ``num_negatives`` non-interacted items.
    """
    tgt = np.asarray(
        targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else targets,
        dtype=np.int64,
    ).reshape(-1)
    if len(histories) != tgt.shape[0]:
        raise ValueError(f"{len(histories)} histories but {tgt.shape[0]} targets")
    if tgt.size and (tgt.min() < 1 or tgt.max() > num_items):
        raise ValueError(f"targets must lie in 1..{num_items}")
    mask = np.zeros((tgt.shape[0], num_items + 1), dtype=bool)
    seen = np.zeros(num_items + 1, dtype=bool)
    for i, (seq, target) in enumerate(zip(histories, tgt)):
        items = np.asarray(seq, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() > num_items):
            raise ValueError(f"history {i} has ids outside 0..{num_items}")
        seen[:] = False
        seen[0] = True
        seen[items] = True
        seen[target] = True
        pool = np.flatnonzero(~seen)
        if pool.size < num_negatives:
            raise ValueError(
                f"user {i} has only {pool.size} non-interacted items, {num_negatives} needed"
            )
        mask[i, rng.choice(pool, size=num_negatives, replace=False)] = True
        mask[i, target] = True
    return torch.from_numpy(mask)


def pad_histories(histories: Sequence[np.ndarray], max_len: int | None = None) -> torch.Tensor:
    """Right-pad histories with 0 into an exclusion tensor for :func:`target_ranks`.

    Args:
        histories: B arrays of item ids.
        max_len: keep only the most recent ``max_len`` items of each (None = all).

    Returns:
        [B, L] long, L = longest kept history (at least 1).
    """
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    kept = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    if max_len is not None:
        kept = [h[-max_len:] for h in kept]
    width = max([1, *(h.size for h in kept)])
    out = np.zeros((len(kept), width), dtype=np.int64)
    for i, h in enumerate(kept):
        out[i, : h.size] = h
    return torch.from_numpy(out)


def per_user_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """[..., U] per-user contribution to ``metric`` (``HR@k``, ``NDCG@k`` or ``MRR``) from 1-based ranks: the metric
    is the mean of these values over users."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0 or np.isnan(r).any() or r.min() < 1:
        raise ValueError("ranks must be a non-empty array of ranks >= 1 (1-based)")
    name, _, cut = metric.partition("@")
    if metric == "MRR":
        return 1.0 / r
    if name in ("HR", "NDCG") and cut.isdigit() and int(cut) >= 1:
        k = int(cut)
        return (r <= k).astype(np.float64) if name == "HR" else np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    raise ValueError(f"metric {metric!r}: expected HR@k, NDCG@k or MRR")


def paired_bootstrap_ranks(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    metric: str = "NDCG@10",
    *,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
):
    """``metric(A) - metric(B)`` for two retrieval models ranked on the same users, with a paired bootstrap over
    users (percentile interval).

    Args:
        ranks_a: [U] or [S_a, U] model A's 1-based target ranks (one row per training seed), user by user.
        ranks_b: [U] or [S_b, U] model B's ranks for the same users in the same order.
        metric: ``HR@k``, ``NDCG@k`` or ``MRR``.

    With several seeds, each user's value is the mean over the model's seeds, so the difference is the seed-mean
    difference and the interval covers the user sampling only (training-seed spread is reported per seed, not
    resampled). Resample k draws U users with replacement from the same seeded stream as the ranking bootstrap
    (:func:`genrec.eval.ranking_metrics.bootstrap_user_counts`), so the same seed gives the same resamples.

    Returns:
        :class:`BootstrapDiff` (``diff`` > 0: A is better).
    """
    a = np.atleast_2d(np.asarray(ranks_a))
    b = np.atleast_2d(np.asarray(ranks_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"ranks_a {a.shape} and ranks_b {b.shape}: expected [S, U] with the same users U")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    va, vb = per_user_values(a, metric), per_user_values(b, metric)  # [S, U]
    delta = va.mean(0) - vb.mean(0)  # [U]
    counts = bootstrap_user_counts(delta.size, num_resamples, seed).astype(np.float64)  # [R, U]
    samples = counts @ delta / delta.size  # [R]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    a_seeds, b_seeds = tuple(float(x) for x in va.mean(1)), tuple(float(x) for x in vb.mean(1))
    paired = len(a_seeds) == len(b_seeds)
    seed_diffs = tuple(x - y for x, y in zip(a_seeds, b_seeds)) if paired else None
    diff = float(delta.mean())
    return BootstrapDiff(
        metric=metric, diff=diff, ci_low=float(low), ci_high=float(high), confidence=confidence,
        excludes_zero=bool(low > 0 or high < 0), num_resamples=num_resamples, num_valid=num_resamples,
        num_users=int(delta.size), a_per_seed=a_seeds, b_per_seed=b_seeds, seed_diffs=seed_diffs,
        seeds_agree=None if seed_diffs is None else all(np.sign(d) == np.sign(diff) for d in seed_diffs),
        samples=samples,
    )  # fmt: skip
