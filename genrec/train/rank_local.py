"""Rank-local data for data-parallel training (``data.shard_by_rank=true`` on a ``data.dataset=preprocessed``
directory): each process reads only its own users and draws its batches from them.

The default data-parallel mode (``genrec.train.distributed``) has every process read the whole data and build the
whole global batch, so that N processes train exactly the one-process model. With rank-local data a process never
loads the other processes' users (``genrec.data.shards``: process r reads partitions r, r + N, ...), which is what
lets a log too large for one process's memory train at all. The price: the run is a different, equally valid run,
not the one-process run step by step, because the global batch is made of other rows.

- **Batches.** Process r cuts its own training rows into batches of ``train.batch_size / N`` rows (the global batch
  of a step is the union of the N local batches; the batch size must divide by N), in an order drawn from
  ``(train.seed, epoch, r)`` with the usual ``epoch_batches`` (length buckets included). The torch generator
  (negatives, dropout) and Stochastic Length are seeded per ``(seed, epoch, r)`` too, so processes do not draw the
  same negatives and masks for their different rows; in-batch negatives come from the local batch.
- **Steps.** DistributedDataParallel needs every process to run the same number of steps. The processes agree
  (``plan_steps``) on the *minimum* of their local batch counts: a process with more batches leaves its last ones
  out of the epoch. Its batch order is drawn afresh every epoch, so different rows are left out each time; with
  the partitions dealt round robin the shares differ by a few users, so at most a batch or so per process is left
  out (the plan logs how many rows).
- **Gradient.** The loss normaliser is the global one, ``train.batch_size`` × the mean training positions per row
  over *all* processes' rows (an all-reduce of sums). Each process divides its local sum by normaliser / N and
  DistributedDataParallel averages the N gradients, which gives the gradient of the global batch's sum divided by
  the normaliser, as in a one-process run.
- **Evaluation.** Each process evaluates its own users (whole, not in shared batches) and the per-user ranks are
  gathered under the users' *global* indices (``evaluate_rank_local``), so metrics and ``test_ranks.npz`` cover all
  users and equal a one-process evaluation of the same weights on the whole data. Only full-catalogue candidates
  allow this (sampled candidates come from one generator in the order of all users); the config refuses the other.
- **Run directory.** Process 0 writes it as usual; the popularity fallback counts every process's interactions (an
  all-reduce), and the results' data summary describes all users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from genrec.data.batches import epoch_batches
from genrec.data.popularity import item_popularity
from genrec.data.sequences import SequenceData
from genrec.eval.evaluate import ScoreFn, UserRanks, evaluate_ranks
from genrec.eval.protocol import EvalProtocol
from genrec.train.distributed import DistInfo, check_batch_size, gather_objects

# Streams of numpy.random.SeedSequence([seed, epoch, rank, stream]): never equal to the one-process entropy
# ([seed, epoch] and [seed, epoch, 1]; trailing zeros do not change a SeedSequence).
_ORDER_STREAM, _LENGTH_STREAM, _TORCH_STREAM = 2, 3, 4


def global_sums(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The sum over the processes of each of ``values`` (the same length everywhere), in one all-reduce (float64:
    counts below 2**53 are exact)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@dataclass(frozen=True)
class StepPlan:
    """How the processes split an epoch: ``batch_size`` rows per process and step, ``steps_per_epoch`` steps on
    every process, ``rows[r]`` training rows on process r, at least ``left_out[r]`` of them left out of each epoch
    (one more batch's worth short when a process's short last batch falls among the steps taken)."""

    batch_size: int
    steps_per_epoch: int
    rows: list[int]
    left_out: list[int]

    def describe(self) -> str:
        counts = [math.ceil(n / self.batch_size) for n in self.rows]
        return (f"{self.steps_per_epoch} steps per epoch on every process: the fewest local batches of "
                f"{self.batch_size} rows (per process: {counts}); rows left out of each epoch per process: at "
                f"least {self.left_out}, a different draw every epoch")  # fmt: skip


def plan_steps(num_rows: int, global_batch_size: int, max_steps_per_epoch: int, info: DistInfo) -> StepPlan:
    """Agree with the other processes on the steps of an epoch: the minimum of the local batch counts (capped by
    ``max_steps_per_epoch`` when > 0). ``ValueError`` on every process when one has no training row."""
    local = check_batch_size(global_batch_size, info.world_size)
    rows = [int(n) for n in gather_objects(int(num_rows), info)]
    empty = [r for r, n in enumerate(rows) if n == 0]
    if empty:
        raise ValueError(
            f"data.shard_by_rank: process(es) {empty} of {info.world_size} hold no user; preprocess with more "
            "partitions (a multiple of the number of processes), or run fewer processes"
        )
    steps = min(math.ceil(n / local) for n in rows)
    if max_steps_per_epoch > 0:
        steps = min(steps, max_steps_per_epoch)
    left_out = [max(0, n - steps * local) for n in rows]
    return StepPlan(batch_size=local, steps_per_epoch=steps, rows=rows, left_out=left_out)


def epoch_batches_local(
    lengths: np.ndarray, plan: StepPlan, seed: int, epoch: int, rank: int, bucket_batches: int
) -> list[np.ndarray]:
    """This process's batches of epoch ``epoch`` (rows into its own training split): ``epoch_batches`` of its rows
    in an order drawn from ``(seed, epoch, rank)``, the first ``plan.steps_per_epoch`` of them."""
    rng = np.random.default_rng([seed, epoch, rank, _ORDER_STREAM])
    return epoch_batches(lengths, plan.batch_size, rng, bucket_batches)[: plan.steps_per_epoch]


def length_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The Stochastic Length generator of process ``rank`` in epoch ``epoch``."""
    return np.random.default_rng([seed, epoch, rank, _LENGTH_STREAM])


def torch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of process ``rank`` in epoch ``epoch`` (negatives, dropout)."""
    return int(np.random.SeedSequence([seed, epoch, rank, _TORCH_STREAM]).generate_state(1, np.uint64)[0] >> 1)


def global_mean_positions(values: np.ndarray, info: DistInfo, device: torch.device) -> float:
    """The mean of ``values`` (one per training row) over every process's rows."""
    total, count = global_sums([float(values.sum()), len(values)], info, device)
    return total / count


def global_item_counts(sequences: SequenceData, info: DistInfo, device: torch.device) -> np.ndarray:
    """[num_items + 1] interaction counts per item over every process's users (``item_popularity`` of all data)."""
    t = torch.as_tensor(item_popularity(sequences), dtype=torch.int64).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def global_summary(sequences: SequenceData, info: DistInfo) -> str:
    """``SequenceData.summary`` of all processes' users together (without the median length, which the processes'
    counts do not give)."""
    n = sequences.lengths
    mine = (sequences.num_users, int(n.sum()), int(n.min()), int(n.max()), int(sequences.has_time.sum()))
    parts = gather_objects(mine, info)
    users = sum(p[0] for p in parts)
    return (
        f"{users:,} users, {sequences.num_items:,} items, {sum(p[1] for p in parts):,} interactions; "
        f"length min/max {min(p[2] for p in parts)}/{max(p[3] for p in parts)}; users with timestamps "
        f"{sum(p[4] for p in parts):,}/{users:,}; read rank-locally by {info.world_size} processes "
        f"({', '.join(f'{p[0]:,}' for p in parts)} users)"
    )


def union_of_user_ranks(parts: list[UserRanks]) -> UserRanks:
    """One result from evaluations of disjoint sets of users (each part evaluated whole, its users already global
    indices): users ascending, repeat targets summed. ``ValueError`` if a user occurs in two parts."""
    users = np.concatenate([p.users for p in parts])
    ranks = np.concatenate([p.ranks for p in parts])
    by_user = np.argsort(users, kind="stable")
    if len(users) > 1 and (np.diff(users[by_user]) == 0).any():
        raise ValueError("rank-local evaluation: two processes ranked the same user (their data overlap)")
    return UserRanks(users=users[by_user], ranks=ranks[by_user], repeat_targets=sum(p.repeat_targets for p in parts))


def evaluate_rank_local(
    score_fn: ScoreFn,
    sequences: SequenceData,
    user_index: np.ndarray,
    protocol: EvalProtocol,
    batch_size: int,
    info: DistInfo,
) -> UserRanks:
    """Per-user ranks of ``protocol`` over every process's users, on every process: each process evaluates its own
    ``sequences`` whole, maps its users to their global indices (``user_index``) and the parts are gathered.

    Full-catalogue protocols only (``ValueError`` otherwise). A process whose evaluation fails (e.g. none of its
    users is left to evaluate) makes every process raise, so none waits for it in a collective."""
    if protocol.candidates != "full":
        raise ValueError(f"rank-local evaluation needs full-catalogue candidates, not {protocol.candidates!r}")
    try:
        part = evaluate_ranks(score_fn, sequences, protocol, batch_size)
        outcome: tuple[str, object] = ("ok", UserRanks(users=np.asarray(user_index)[part.users], ranks=part.ranks,
                                                       repeat_targets=part.repeat_targets))  # fmt: skip
    except ValueError as exc:
        outcome = ("error", str(exc))
    outcomes = gather_objects(outcome, info)
    failed = [f"process {r}: {value}" for r, (status, value) in enumerate(outcomes) if status == "error"]
    if failed:
        raise ValueError(f"rank-local evaluation of protocol {protocol.name} failed on {'; '.join(failed)}")
    return union_of_user_ranks([value for _, value in outcomes])
