"""Ranking floors (item popularity, logistic regression) and the pieces every ranking model shares.

Every ranking model in genrec reads a :class:`~genrec.data.ranking_batch.RankingBatch` and returns one logit per
(candidate, task), ``[B, C, T]``, plus ``loss(batch)``: binary cross-entropy per task on the real candidates, combined
with fixed task weights. This module holds that shared contract and the two floors a learned ranker must beat:

* :class:`ItemPopularityRanker`: the training-period positive rate of each (item, task), smoothed toward the task's
  global rate with a Beta-style prior of ``prior_strength`` pseudo-impressions:

      p(i, t) = (positives(i, t) + m · g(t)) / (impressions(i) + m),     g(t) = Σᵢ positives(i, t) / Σᵢ impressions(i)

  Counted on the real candidates of the training batches only (history events are not counted: the same event
  recurs in the history of many examples and would be counted once per example). It has no parameters and is fitted
  by counting (``fit``), not by gradient steps; its logit is logit(p(i, t)).
* :class:`LogisticRegressionRanker`: one linear model per task over the dense features plus one-hot ids (candidate
  item, user, each user feature) mapped to a shared table of ``num_buckets`` weights by the hashing trick
  (K. Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009; the model of
  H. B. McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013, trained with Adam here instead of
  FTRL-Proximal). Each field has its own Carter–Wegman hash ((a·id + b) mod p) mod num_buckets, p = 2³¹ − 1, with
  fixed per-field (a, b), so equal ids of different fields usually land in different buckets. Dense features enter
  raw: they are expected on a sensible scale (rates, log-counts), as the data side builds them.

Shared pieces used by :mod:`genrec.models.dlrm` and :mod:`genrec.models.din` (and meant for the HSTU ranker):
:func:`real_candidates`, :func:`scatter_candidates`, :func:`multitask_bce_loss`.

Padded candidates (``cand_mask`` False) get logit 0 for every task; models compute only on real candidates, so
neither candidate padding nor other candidates of the same row can change a real candidate's logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.ranking_batch import RankingBatch, RankingSchema

__all__ = [
    "ItemPopularityRanker",
    "LogisticRegressionRanker",
    "check_task_weights",
    "init_output_biases",
    "multitask_bce_loss",
    "multitask_bce_per_task",
    "multitask_loss_terms",
    "real_candidates",
    "scatter_candidates",
]

_PRIME = 2_147_483_647  # 2^31 - 1, the modulus of the per-field universal hash


# ---------------------------------------------------------------------------------------------- shared contract
def check_task_weights(task_weights: Sequence[float] | None, schema: RankingSchema) -> tuple[float, ...]:
    """The T task weights (all 1.0 when None); ValueError unless there is one finite, non-negative weight per task
    and at least one is positive."""
    if task_weights is None:
        return (1.0,) * schema.num_tasks
    weights = tuple(float(w) for w in task_weights)
    if len(weights) != schema.num_tasks:
        raise ValueError(f"task_weights: {len(weights)} weights for {schema.num_tasks} tasks {schema.tasks}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"task_weights must be finite, non-negative and not all zero, got {weights}")
    return weights


def init_output_biases(head: nn.Module, base_rates: Sequence[float] | None, schema: RankingSchema) -> None:
    """Start the T output biases of ``head`` (any module with a ``bias`` [T], e.g. an nn.Linear head) at
    logit(base rate) of each task (a model that starts at the base rate does not spend its first steps learning it,
    which matters for rare tasks); leave them as they are when ``base_rates`` is None. ValueError unless there is
    one rate in (0, 1) per task."""
    if base_rates is None:
        return
    rates = tuple(float(r) for r in base_rates)
    if len(rates) != schema.num_tasks:
        raise ValueError(f"task_base_rates: {len(rates)} rates for {schema.num_tasks} tasks {schema.tasks}")
    if not all(0.0 < r < 1.0 for r in rates):  # NaN fails too
        raise ValueError(f"task_base_rates must lie strictly between 0 and 1, got {rates}")
    with torch.no_grad():
        r = torch.tensor(rates, dtype=torch.float64)
        head.bias.copy_((torch.log(r) - torch.log1p(-r)).to(head.bias.dtype))


def real_candidates(batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the real candidates are.

    Returns:
        flat: [N] long, index of each real candidate in the flattened [B * C] candidate grid (row-major).
        rows: [N] long, the batch row of each real candidate.
    """
    C = batch.cand_items.shape[1]
    flat = batch.cand_mask.reshape(-1).nonzero().squeeze(1)  # [N]
    return flat, torch.div(flat, C, rounding_mode="floor")


def scatter_candidates(values: torch.Tensor, flat: torch.Tensor, batch: RankingBatch) -> torch.Tensor:
    """[N, T] logits of the real candidates -> [B, C, T], with 0 at padded candidates."""
    B, C = batch.cand_items.shape
    out = values.new_zeros(B * C, values.shape[-1])
    out = out.index_copy(0, flat, values)
    return out.view(B, C, values.shape[-1])


def multitask_bce_per_task(
    logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor, label_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-task mean BCE-with-logits over the labelled candidates -> [T].

    logits [B, C, T], labels [B, C, T] (0/1 or soft targets in [0, 1]), mask [B, C] bool (real candidates),
    label_weights [B, C, T] (>= 0, ``RankingBatch.label_weights``) or None (weight 1 everywhere).
    loss_t = Σ_{b,c} real · w_bct · BCE_bct / Σ_{b,c} real · w_bct, and 0 for a task without a labelled candidate
    in the batch (its gradient is then 0). Without weights the denominator is the number of real candidates, the
    same for every task. Padded candidates contribute nothing, whatever their labels hold. ValueError when labels
    are missing, not in [0, 1], or the weights have another shape or are negative / not finite.
    """
    if labels is None:
        raise ValueError("RankingBatch.labels is None: the loss needs labelled candidates")
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    real = mask.unsqueeze(-1).expand_as(labels).to(logits.dtype)  # [B, C, T]
    if label_weights is not None:
        if label_weights.shape != logits.shape:
            raise ValueError(f"label_weights shape {tuple(label_weights.shape)} does not match logits "
                             f"{tuple(logits.shape)}")  # fmt: skip
        if label_weights.numel() and not bool((torch.isfinite(label_weights) & (label_weights >= 0)).all()):
            raise ValueError("RankingBatch.label_weights: weights must be finite and >= 0")
        real = real * label_weights.to(logits.dtype)
    target = torch.where(real > 0, labels.to(logits.dtype), torch.zeros((), dtype=logits.dtype, device=logits.device))
    if target.numel() and not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError("RankingBatch.labels: real candidates' labels must lie in [0, 1] (NaN is refused too)")
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * real  # [B, C, T]
    if label_weights is None:
        return per.sum(dim=(0, 1)) / mask.sum().clamp_min(1).to(logits.dtype)  # [T]
    denom = real.sum(dim=(0, 1))  # [T]
    return torch.where(denom > 0, per.sum(dim=(0, 1)) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def multitask_bce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    task_weights: Sequence[float],
    label_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_t w_t · loss_t with loss_t from :func:`multitask_bce_per_task` (the mean BCE-with-logits of task t over its
    labelled real candidates). A batch without real candidates gives a zero loss that still backpropagates."""
    per_task = multitask_bce_per_task(logits, labels, mask, label_weights)  # [T]
    weights = torch.tensor(task_weights, dtype=logits.dtype, device=logits.device)
    return (per_task * weights).sum()


def multitask_loss_terms(
    logits: torch.Tensor, batch: RankingBatch, task_weights: Sequence[float], tasks: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A ranker's ``loss`` output: (Σ_t w_t · loss_t, {task name: loss_t}) for the batch's labels and label
    weights (the per-task terms are what multi-objective balancing reads)."""
    per_task = multitask_bce_per_task(logits, batch.labels, batch.cand_mask, batch.label_weights)  # [T]
    weights = torch.tensor(task_weights, dtype=logits.dtype, device=logits.device)
    return (per_task * weights).sum(), {name: per_task[t] for t, name in enumerate(tasks)}


# ---------------------------------------------------------------------------------------------- popularity floor
class ItemPopularityRanker(nn.Module):
    """Per-(item, task) training positive rate, smoothed toward the task's global rate (see the module docstring).

    ``fit(batches)`` counts; ``forward(batch) -> [B, C, T]`` logits; ``loss(batch)`` is the shared multi-task BCE
    (there is nothing to train, it is for evaluation). Counts live in buffers, so they are saved in the state dict.
    """

    def __init__(
        self, schema: RankingSchema, prior_strength: float = 10.0, task_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if not (math.isfinite(prior_strength) and prior_strength > 0):
            raise ValueError(f"prior_strength must be a positive number, got {prior_strength}")
        self.schema = schema
        self.prior_strength = float(prior_strength)
        self.task_weights = check_task_weights(task_weights, schema)
        self.register_buffer("positives", torch.zeros(schema.num_items + 1, schema.num_tasks, dtype=torch.float64))
        self.register_buffer("impressions", torch.zeros(schema.num_items + 1, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: RankingBatch) -> ItemPopularityRanker:
        """Add one labelled training batch's real candidates to the counts."""
        batch.validate(self.schema)
        if batch.labels is None:
            raise ValueError("RankingBatch.labels is None: the popularity floor is fitted on labelled candidates")
        items = batch.cand_items[batch.cand_mask]  # [N]
        labels = batch.labels[batch.cand_mask].to(torch.float64)  # [N, T]
        if labels.numel() and not bool(((labels >= 0) & (labels <= 1)).all()):
            raise ValueError("RankingBatch.labels: real candidates' labels must lie in [0, 1]")
        self.positives.index_add_(0, items.to(self.positives.device), labels.to(self.positives.device))
        self.impressions.index_add_(0, items.to(self.impressions.device),
                                    torch.ones_like(items, dtype=torch.float64, device=self.impressions.device))
        return self

    def fit(self, batches: Iterable[RankingBatch]) -> ItemPopularityRanker:
        """Reset the counts and count every batch (the training period's candidates)."""
        self.positives.zero_()
        self.impressions.zero_()
        for batch in batches:
            self.update(batch)
        return self

    def probabilities(self) -> torch.Tensor:
        """[num_items + 1, T] float64 smoothed positive rates (row 0, padding, holds the global rate)."""
        total = float(self.impressions.sum())
        if total == 0:
            raise RuntimeError("ItemPopularityRanker: call fit() on labelled training batches first")
        global_rate = self.positives.sum(0) / total  # [T]
        m = self.prior_strength
        return (self.positives + m * global_rate) / (self.impressions + m).unsqueeze(1)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """[B, C, T] float32 logits of the smoothed rates (clamped to [1e-6, 1 - 1e-6]); 0 at padded candidates."""
        batch.validate(self.schema)
        probs = self.probabilities().clamp(1e-6, 1 - 1e-6)  # [num_items + 1, T]
        logits = torch.logit(probs).to(torch.float32)[batch.cand_items.to(probs.device)]  # [B, C, T]
        return logits * batch.cand_mask.unsqueeze(-1).to(logits.device)

    def loss(self, batch: RankingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Σ_t w_t · loss_t, {task: loss_t}), loss_t the mean BCE of task t over its labelled real candidates
        (``genrec.models.ranking_floors.multitask_loss_terms``; ``batch.label_weights`` weigh the labels)."""
        return multitask_loss_terms(self(batch), batch, self.task_weights, self.schema.tasks)


# ---------------------------------------------------------------------------------------------- logistic regression
class LogisticRegressionRanker(nn.Module):
    """logit_t = w_t · dense + b_t + Σ_fields v[hash_f(id_f), t]  (one linear model per task; see the module docstring).

    Fields: candidate item id, user id, each user feature (id 0, unknown, is a value like any other). Trained by
    gradient steps on ``loss(batch)`` like the learned rankers. The hashed weights start at zero, the per-task bias
    at zero or, with ``task_base_rates``, at logit(base rate), the dense weights at nn.Linear's default.
    """

    def __init__(
        self,
        schema: RankingSchema,
        num_buckets: int = 1 << 20,
        task_weights: Sequence[float] | None = None,
        seed: int = 0,
        task_base_rates: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.schema = schema
        self.num_buckets = int(num_buckets)
        self.task_weights = check_task_weights(task_weights, schema)
        T = schema.num_tasks
        D = len(schema.dense_features)
        self.dense = nn.Linear(D, T, bias=False) if D else None  # w_t
        self.bias = nn.Parameter(torch.zeros(T))  # b_t
        init_output_biases(self, task_base_rates, schema)  # b_t = logit(base rate of t) when given
        self.hashed = nn.Embedding(self.num_buckets, T)  # [num_buckets, T]
        nn.init.zeros_(self.hashed.weight)
        num_fields = 2 + len(schema.user_features)
        gen = torch.Generator().manual_seed(seed)
        a = torch.randint(1, _PRIME, (num_fields,), generator=gen)
        b = torch.randint(0, _PRIME, (num_fields,), generator=gen)
        self.register_buffer("hash_a", a, persistent=True)  # [num_fields] long
        self.register_buffer("hash_b", b, persistent=True)

    def buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, num_fields] long (non-negative) -> [N, num_fields] long buckets. a·(id mod p) < 2⁶² fits int64."""
        h = (self.hash_a * torch.remainder(ids, _PRIME) + self.hash_b) % _PRIME
        return h % self.num_buckets

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """[B, C, T] logits; 0 at padded candidates."""
        batch.validate(self.schema)
        flat, rows = real_candidates(batch)
        dense = batch.dense_features.flatten(0, 1)[flat]  # [N, D]
        ids = torch.cat(
            [batch.cand_items.reshape(-1, 1)[flat], batch.user_ids[rows].unsqueeze(1), batch.user_features[rows]],
            dim=1,
        )  # [N, num_fields]
        logits = self.bias + self.hashed(self.buckets(ids)).sum(1)  # [N, T]
        if self.dense is not None:
            logits = logits + self.dense(dense.to(self.bias.dtype))
        return scatter_candidates(logits, flat, batch)

    def loss(self, batch: RankingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Σ_t w_t · loss_t, {task: loss_t}), loss_t the mean BCE of task t over its labelled real candidates
        (``genrec.models.ranking_floors.multitask_loss_terms``; ``batch.label_weights`` weigh the labels)."""
        return multitask_loss_terms(self(batch), batch, self.task_weights, self.schema.tasks)
