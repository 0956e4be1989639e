"""Big-to-small distillation of rankers: a teacher's logits as soft targets for a student.

Meta Lattice (L. Luo et al., arXiv:2512.09200) and ExFM (M. Li et al., "External Large Foundation Model", 2025) let
one large model teach the small models that serve: the teacher's predictions on the training impressions are
logged next to the labels, and the student trains on both (knowledge distillation, Hinton et al. 2015). Two
ways of reading the teacher are compared in ``bench/lattice_distill.py``:

* **serving head**: the student's own task heads fit the mix. Binary cross-entropy is linear in its target, so
  ``(1 - α) · BCE(z, y) + α · BCE(z, p) = BCE(z, (1 - α) · y + α · p)``: the batch's labels are replaced by the mix
  and every ranker's own loss is used unchanged (:func:`distill_batch`).
* **auxiliary head**: the student gets one extra head per task, ``teacher:<task>`` (:func:`aux_schema`), trained on
  the teacher's probabilities with weight ``α · w_t`` while the serving heads keep the labels with ``(1 - α) · w_t``;
  the shared layers learn from both, serving reads only the first T logits (:class:`ServingHeads`). The serving
  heads are then never pulled toward a teacher's miscalibration.

``p = sigmoid(teacher logit / τ)`` (temperature τ, 1 by default). The teacher's logits are computed once for every
training candidate (:func:`teacher_targets`), keyed by the candidate's event index in the dataset, so the student
may cut rows into candidates differently and read any history length.

The shared-layer interface is the one every ranker already has: heads are built from ``schema.num_tasks`` and the
loss reads ``batch.labels`` [B, C, T] and ``batch.label_weights``; labels in [0, 1] (soft) are accepted by all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from genrec.data.ranking.events import RankingDataset
from genrec.data.ranking_batch import RankingBatch, RankingSchema

__all__ = [
    "DISTILL_HEADS",
    "TEACHER_PREFIX",
    "ServingHeads",
    "TeacherTargets",
    "aux_schema",
    "aux_task_weights",
    "distill_batch",
    "distilled_batches",
    "teacher_targets",
]

DISTILL_HEADS = ("serving", "aux")
TEACHER_PREFIX = "teacher:"


def aux_schema(schema: RankingSchema) -> RankingSchema:
    """``schema`` with one auxiliary task ``teacher:<task>`` per task appended (the student's extra heads)."""
    clash = [t for t in schema.tasks if t.startswith(TEACHER_PREFIX)]
    if clash:
        raise ValueError(f"task names {clash} start with {TEACHER_PREFIX!r}, the prefix of the auxiliary heads")
    return dataclasses.replace(schema, tasks=schema.tasks + tuple(TEACHER_PREFIX + t for t in schema.tasks))


def aux_task_weights(task_weights: Sequence[float] | None, num_tasks: int, weight: float) -> tuple[float, ...]:
    """Loss weights of the aux-head student's 2T tasks: ``(1 - α) · w`` for the labels, ``α · w`` for the teacher."""
    w = tuple(task_weights) if task_weights is not None else (1.0,) * num_tasks
    if len(w) != num_tasks:
        raise ValueError(f"{len(w)} task weights for {num_tasks} tasks")
    return tuple((1.0 - weight) * x for x in w) + tuple(weight * x for x in w)


class ServingHeads(nn.Module):
    """A ranker trained with auxiliary heads, serving its first ``num_tasks`` logits only.

    ``forward(batch) -> [B, C, T]`` (the labels' heads); ``loss`` is the inner ranker's over all 2T heads (the batch
    carries the teacher's targets as the last T labels, see :func:`distill_batch`).
    """

    def __init__(self, inner: nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_tasks = int(num_tasks)

    @property
    def reads_dense_features(self) -> bool:
        return bool(getattr(self.inner, "reads_dense_features", True))

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        # forward never reads labels; an evaluation batch carries T of them, the inner schema has 2T tasks
        unlabelled = dataclasses.replace(batch, labels=None, hist_labels=None, label_weights=None)
        return self.inner(unlabelled)[..., : self.num_tasks]  # [B, C, T]

    def loss(self, batch: RankingBatch):
        return self.inner.loss(batch)


@dataclass(frozen=True)
class TeacherTargets:
    """A teacher's logits for candidate events: ``events`` [K] sorted event indices, ``logits`` [K, T] float32."""

    tasks: tuple[str, ...]
    events: np.ndarray
    logits: np.ndarray

    def lookup(self, cand_events: np.ndarray, cand_mask: np.ndarray) -> torch.Tensor:
        """[B, C, T] teacher logits of the real candidates (0 at padding); ValueError when one is missing."""
        pos = np.searchsorted(self.events, cand_events)  # [B, C]
        inside = pos < self.events.size
        found = np.zeros(cand_events.shape, dtype=bool)
        found[inside] = self.events[pos[inside]] == cand_events[inside]
        missing = cand_mask & ~found
        if missing.any():
            raise ValueError(f"the teacher has no logits for {int(missing.sum())} candidate(s) of the batch (event "
                             f"{int(cand_events[missing][0])}, ...): were they computed on another dataset or part?")
        out = np.where((cand_mask & found)[..., None], self.logits[np.minimum(pos, self.events.size - 1)], 0.0)
        return torch.from_numpy(out.astype(np.float32))


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    dataset: RankingDataset,
    part: str = "train",
    *,
    batch_size: int = 256,
    max_history: int = 200,
    max_candidates: int | None = None,
    device: torch.device | str = "cpu",
) -> TeacherTargets:
    """The teacher's logits (eval mode) for every candidate of ``part``, once; rows cut with ``max_candidates``
    and histories of ``max_history`` events, the teacher's own settings."""
    teacher.eval()
    rows = dataset.rows(part, max_candidates)
    events, logits = [], []
    for which in dataset.batch_rows(part, batch_size, shuffle=False, max_candidates=max_candidates):
        batch = dataset.make_batch(rows, which, max_history)
        cidx, cmask = dataset.candidate_events(rows, which)
        z = teacher(batch.to(device)).float().cpu().numpy()  # [B, C, T]
        if not np.isfinite(z[cmask]).all():
            raise FloatingPointError(f"the teacher gave NaN or infinite logits on the {part} part")
        events.append(cidx[cmask])
        logits.append(z[cmask])
    T = dataset.schema.num_tasks
    ev = np.concatenate(events) if events else np.zeros(0, np.int64)
    lg = np.concatenate(logits) if logits else np.zeros((0, T), np.float32)
    order = np.argsort(ev, kind="stable")
    return TeacherTargets(dataset.schema.tasks, ev[order].astype(np.int64), lg[order].astype(np.float32))


def distill_batch(batch: RankingBatch, teacher_logits: torch.Tensor, head: str, weight: float,
                  temperature: float = 1.0) -> RankingBatch:  # fmt: skip
    """``batch`` with the teacher's targets: serving head, labels ``(1 - α) · y + α · p``; aux head, labels
    ``[y, p]`` [B, C, 2T] (label weights extended with 1 for the teacher's tasks). ``p = sigmoid(logit / τ)``."""
    if head not in DISTILL_HEADS:
        raise ValueError(f"head must be one of {DISTILL_HEADS}, got {head!r}")
    if batch.labels is None:
        raise ValueError("distillation needs the batch's labels")
    if teacher_logits.shape != batch.labels.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the labels "
                         f"{tuple(batch.labels.shape)}")  # fmt: skip
    real = batch.cand_mask.unsqueeze(-1).to(batch.labels.dtype)  # [B, C, 1]
    p = torch.sigmoid(teacher_logits.to(batch.labels.dtype) / temperature) * real  # [B, C, T]
    if head == "serving":
        return dataclasses.replace(batch, labels=(1.0 - weight) * batch.labels + weight * p)
    weights = batch.label_weights
    if weights is not None:
        weights = torch.cat([weights, torch.ones_like(weights)], dim=-1)  # [B, C, 2T]
    return dataclasses.replace(batch, labels=torch.cat([batch.labels, p], dim=-1), label_weights=weights)


def distilled_batches(
    dataset: RankingDataset,
    targets: TeacherTargets,
    *,
    head: str,
    weight: float,
    temperature: float,
    batch_size: int,
    seed: int,
    max_history: int,
    max_candidates: int | None,
    with_hist_labels: bool = False,
) -> Iterator[RankingBatch]:
    """The shuffled training batches :meth:`RankingDataset.batches` gives for ``seed``, with the teacher's targets."""
    rows = dataset.rows("train", max_candidates)
    for which in dataset.batch_rows("train", batch_size, shuffle=True, seed=seed, max_candidates=max_candidates):
        batch = dataset.make_batch(rows, which, max_history, with_hist_labels)
        cidx, cmask = dataset.candidate_events(rows, which)
        yield distill_batch(batch, targets.lookup(cidx, cmask), head, weight, temperature)
