"""Run an evaluation protocol over a leave-one-out split with any scorer (neural model or baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from genrec.data.batches import history_batch, split_histories
from genrec.data.sequences import SequenceData, Split, leave_one_out
from genrec.eval.metrics import (
    RankAccumulator,
    metrics_from_ranks,
    sample_candidates,
    target_ranks,
)
from genrec.eval.protocol import EvalProtocol
from genrec.io import atomic_write

# score_fn(histories, history_times, query_times, has_time) -> scores [B, num_items + 1]
ScoreFn = Callable[[list, list, np.ndarray, np.ndarray], torch.Tensor]


def model_score_fn(model: nn.Module, max_len: int, device: str | torch.device = "cpu") -> ScoreFn:
    """Full-catalogue scores from an encoder: last position's user vector · every item vector."""

    @torch.no_grad()
    def score(histories, history_times, query_times, has_time) -> torch.Tensor:
        batch = history_batch(histories, history_times, query_times, has_time, max_len).to(device)
        user = model.encode_last(batch)  # [B, d]: the last position's output
        return (user @ model.item_vectors().T).float().cpu()  # [B, num_items + 1]

    return score


def baseline_score_fn(recommender) -> ScoreFn:
    return lambda histories, history_times, query_times, has_time: recommender.score(histories)


# Metrics that are counts of users, not rates: printed as integers.
INTEGER_METRICS = ("count", "repeat_targets")


def repeat_targets(data: SequenceData, split: Split, max_history: int) -> np.ndarray:
    """[U] bool: the user's target also occurs in the history the protocol sees (its last ``max_history`` items)."""
    assert split.target_pos is not None
    targets = data.items[split.target_pos]
    lo = np.maximum(split.starts, split.ends - max_history)
    return np.fromiter(
        (t in data.items[a:b] for t, a, b in zip(targets, lo, split.ends)), dtype=bool, count=len(targets)
    )


@dataclass(frozen=True)
class UserRanks:
    """Per-user outcome of a protocol: ``users`` [U] user indices (``SequenceData`` order, sorted), ``ranks`` [U]
    1-based target ranks, and how many repeat targets were left out (``repeat_targets``). Two runs on the same data
    and protocol rank the same users, so their ranks can be compared user by user (a paired bootstrap)."""

    users: np.ndarray
    ranks: np.ndarray
    repeat_targets: int

    def save(self, path: str | Path) -> None:
        """Write ``users``, ``ranks`` and ``repeat_targets`` to an ``.npz`` file, atomically."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a path
                np.savez(fh, users=self.users, ranks=self.ranks, repeat_targets=np.int64(self.repeat_targets))

        atomic_write(path, write)

    @classmethod
    def merge(cls, parts: list[UserRanks]) -> UserRanks:
        """One result from the disjoint parts of a sharded evaluation (``evaluate_ranks(..., shard=...)``), users
        ascending: equal to the unsharded result."""
        if not parts or len({p.repeat_targets for p in parts}) != 1:
            raise ValueError("UserRanks.merge: needs one or more parts of the same evaluation")
        users = np.concatenate([p.users for p in parts])
        ranks = np.concatenate([p.ranks for p in parts])
        by_user = np.argsort(users, kind="stable")
        if len(users) > 1 and (np.diff(users[by_user]) == 0).any():
            raise ValueError("UserRanks.merge: the parts overlap (a user is ranked twice)")
        return cls(users=users[by_user], ranks=ranks[by_user], repeat_targets=parts[0].repeat_targets)

    @classmethod
    def load(cls, path: str | Path) -> UserRanks:
        with np.load(path, allow_pickle=False) as z:
            return cls(users=z["users"], ranks=z["ranks"], repeat_targets=int(z["repeat_targets"]))


def evaluate_ranks(
    score_fn: ScoreFn,
    data: SequenceData,
    protocol: EvalProtocol,
    batch_size: int = 512,
    shard: tuple[int, int] | None = None,
) -> UserRanks:
    """The target rank of every evaluated user under ``protocol`` (see :func:`evaluate` for who is evaluated).

    ``shard=(rank, world_size)``: score only batches ``rank, rank + world_size, ...`` of the unsharded run and return
    the ranks of their users. The batches are the unsharded ones (same rows, same ``batch_size``) and sampled
    candidates are still drawn for every batch, in order, so ``UserRanks.merge`` of the ``world_size`` parts equals
    the unsharded result exactly.
    """
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"evaluate_ranks: shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    split = leave_one_out(data, protocol.target)
    acc = RankAccumulator()
    rng = protocol.rng()
    # Rows go in order of history length so that each padded batch wastes little work; metrics are order-free.
    order = np.argsort(np.minimum(split.ends - split.starts, protocol.max_history), kind="stable")
    if protocol.users != "all":
        timed = data.has_time[split.users[order]]
        order = order[timed if protocol.users == "with-timestamps" else ~timed]
        if len(order) == 0:
            raise ValueError(f"protocol {protocol.name}: no user to evaluate")
    repeats = repeat_targets(data, split, protocol.max_history)[order]
    n_repeats = int(repeats.sum())
    if protocol.exclude_seen and n_repeats:
        order = order[~repeats]
        if len(order) == 0:
            raise ValueError(
                f"protocol {protocol.name}: every target also occurs in its history (repeat consumption), and with "
                "exclude_seen such users are left out, so no user is left to evaluate; evaluate with "
                "eval.exclude_seen=false, or check the data for duplicate rows"
            )
    scored = []  # [num batches scored] arrays of rows into ``split``
    for index, lo in enumerate(range(0, len(order), batch_size)):
        rows = order[lo : lo + batch_size]
        mine = shard is None or index % shard[1] == shard[0]
        if not mine and protocol.candidates != "sampled":
            continue
        hist, htimes, qtimes, has_time, targets = split_histories(data, split, rows, protocol.max_history)
        if not mine:  # another shard scores this batch; its candidates are drawn here too, to keep ``rng`` in step
            sample_candidates([data.sequence(u) for u in split.users[rows]], targets, data.num_items,
                              protocol.num_negatives, rng)  # fmt: skip
            continue
        scored.append(rows)
        scores = score_fn(hist, htimes, qtimes, has_time)
        targets_t = torch.as_tensor(targets, dtype=torch.long)
        exclude = None
        if protocol.exclude_seen:
            width = max(len(h) for h in hist)
            exclude = torch.zeros(len(rows), width, dtype=torch.long)
            for r, h in enumerate(hist):
                exclude[r, : len(h)] = torch.as_tensor(h)
        candidates = None
        if protocol.candidates == "sampled":
            whole = [data.sequence(u) for u in split.users[rows]]
            candidates = sample_candidates(whole, targets, data.num_items, protocol.num_negatives, rng)
        acc.add(target_ranks(scores, targets_t, exclude, candidates))
    users = split.users[np.concatenate(scored)] if scored else np.zeros(0, dtype=split.users.dtype)
    by_user = np.argsort(users, kind="stable")
    return UserRanks(users=users[by_user], ranks=acc.ranks[by_user], repeat_targets=n_repeats)


def evaluate(score_fn: ScoreFn, data: SequenceData, protocol: EvalProtocol, batch_size: int = 512) -> dict[str, float]:
    """Metrics of ``protocol`` (target valid/test, full or sampled candidates, seen-item exclusion).

    Repeat targets (the target also occurs in the history; see :meth:`EvalProtocol.describe`) are counted in
    ``"repeat_targets"`` when there are any; with ``exclude_seen`` those users are left out of every metric and of
    ``"count"``.
    """
    return metrics_from_user_ranks(evaluate_ranks(score_fn, data, protocol, batch_size), protocol)


def metrics_from_user_ranks(result: UserRanks, protocol: EvalProtocol) -> dict[str, float]:
    """The protocol's metrics from per-user ranks (plus ``repeat_targets`` when there were any)."""
    metrics = metrics_from_ranks(result.ranks, protocol.hr_ks, protocol.ndcg_ks)
    if result.repeat_targets:
        metrics["repeat_targets"] = result.repeat_targets
    return metrics
