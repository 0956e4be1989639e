"""Streaming training under delayed feedback: pretrain, then per segment evaluate on true labels and train on the
labels a method may observe, and the stream metrics (AUC, PR-AUC, log loss, calibration) with user resampling.

Protocol (the streaming protocol of the delayed-feedback literature, e.g. Gu et al., "Real Negatives Matter:
Continuous Training with Real Negatives for Delayed Feedback Modeling" (DEFER), KDD 2021, and Dai et al.,
"Generalized Delayed Feedback Model with Post-Click Information in Recommender Systems" (GDFM), NeurIPS 2022): the
model is pretrained on the examples whose labels are complete at the stream start ``b_0``
(:func:`genrec.data.delayed.pretrain_plan`), then for each boundary ``b_k`` in turn

1. it is trained on the examples the method's :class:`~genrec.data.delayed.TrainingPlan` puts at ``b_k`` (every
   one of them clicked, and every label it reads observed, by ``b_k``; the ``oracle`` plan excepted),
   ``passes`` passes in mini-batches shuffled by ``numpy.random.default_rng([seed, k])``;
2. the clicks of segment ``k`` (``[b_k, b_{k+1})``) are predicted, before any of their labels is trained on.

The predictions are the served head's probability (the longest window, the last task). **Pretrain** is the
pretrained model evaluated on every segment without further training.

The model is any ranker over :class:`~genrec.data.ranking_batch.RankingBatch` with one task per window (the tasks
in ascending window order) whose ``loss(batch)`` returns ``(total, {task: loss_t})`` honouring ``label_weights``.
Each example is one row with one candidate, its history (``StreamData.history``; empty when None),
``StreamData.features`` as ``user_features`` and ``StreamData.dense`` as its dense features. The
training loss is ``Σ_t λ_t · loss_t`` with ``loss_t`` the mean BCE over the examples labelled for head t and
``λ`` the :class:`StreamConfig` head weights: for ``window_heads`` (and Pretrain, which trains every head) the
routing probabilities, so the shared layers see every example with about the same weight as under a one-head
method (λ = one-hot on the longest head for ``vanilla``, ``wait`` and ``oracle``). Same model size, optimizer
(Adam), batch size, passes and seeds for every method.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from genrec.data.delayed import TrainingPlan, segment_of, window_labels
from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.eval.ranking_metrics import (
    average_precision,
    resampled_auc,
    resampled_average_precision,
)

__all__ = [
    "StreamConfig",
    "StreamData",
    "StreamHistory",
    "StreamResult",
    "StreamTensors",
    "average_precision",
    "make_batch",
    "predict",
    "pretrain",
    "resampled_stream_metrics",
    "run_stream",
    "stream_metrics",
    "true_labels",
]


@dataclass(frozen=True)
class StreamHistory:
    """Each example's earlier events (all strictly before its click), left-aligned, oldest first, 0-padded."""

    items: np.ndarray  # [N, L] int64 item ids, 0 = padding
    actions: np.ndarray  # [N, L] int64 action bitmasks (schema.actions), 0 = padding
    times: np.ndarray  # [N, L] int64 seconds, 0 = padding
    lengths: np.ndarray  # [N] int64 real events per row

    def check(self, click: np.ndarray) -> None:
        n, L = self.items.shape
        if self.actions.shape != (n, L) or self.times.shape != (n, L) or self.lengths.shape != (n,):
            raise ValueError(f"StreamHistory: items, actions, times must be [{n}, {L}] and lengths [{n}]")
        real = np.arange(L)[None, :] < self.lengths[:, None]  # [N, L]
        if bool((self.lengths < 0).any()) or bool((self.lengths > L).any()) or bool((self.items[~real] != 0).any()):
            raise ValueError("StreamHistory: rows must be left-aligned with lengths in [0, L]")
        if bool((np.where(real, self.times, np.iinfo(np.int64).min) >= click[:, None]).any()):
            raise ValueError("StreamHistory: a history event is not strictly before its example's click")


@dataclass(frozen=True)
class StreamData:
    """N click examples in click-time order, and the schema of the ranker that reads them."""

    users: np.ndarray  # [N] int64 user ids 1..schema.num_users
    items: np.ndarray  # [N] int64 item ids 1..schema.num_items
    features: np.ndarray  # [N, F] int64 row categoricals (schema.user_features)
    click: np.ndarray  # [N] int64 seconds, non-decreasing
    convert: np.ndarray  # [N] int64 seconds, NEVER when no conversion
    schema: RankingSchema  # one task per window, ascending
    dense: np.ndarray | None = None  # [N, D] float row features known at click time (schema.dense_features); None: D=0
    history: StreamHistory | None = None  # each example's earlier events; None: empty histories

    def __post_init__(self) -> None:
        n = self.click.shape[0]
        if self.history is not None:
            if self.history.items.shape[0] != n:
                raise ValueError(f"StreamData.history: {self.history.items.shape[0]} rows for {n} examples")
            self.history.check(self.click)
        d = len(self.schema.dense_features)
        if (self.dense is None and d) or (self.dense is not None and self.dense.shape != (n, d)):
            raise ValueError(f"StreamData.dense: expected shape ({n}, {d}) (the schema's dense features)")
        if self.dense is not None and not np.isfinite(self.dense).all():
            raise ValueError("StreamData.dense: NaN or infinite values")
        for name in ("users", "items", "convert"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"StreamData.{name}: shape {getattr(self, name).shape}, expected ({n},)")
        if self.features.shape != (n, len(self.schema.user_features)):
            raise ValueError(f"StreamData.features: shape {self.features.shape}, expected "
                             f"({n}, {len(self.schema.user_features)})")  # fmt: skip
        if n and bool((np.diff(self.click) < 0).any()):
            raise ValueError("StreamData.click: examples must be in click-time order")

    def __len__(self) -> int:
        return int(self.click.shape[0])


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 512
    lr: float = 1e-3
    passes: int = 1  # passes over each boundary's training examples
    pretrain_epochs: int = 1
    head_weights: tuple[float, ...] | None = None  # λ per task for routed / pretrain training; None = uniform
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.passes < 1 or self.pretrain_epochs < 0:
            raise ValueError("StreamConfig: batch_size >= 1, passes >= 1 and pretrain_epochs >= 0 are required")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"StreamConfig.lr must be > 0, got {self.lr}")
        if self.head_weights is not None and (min(self.head_weights) < 0 or sum(self.head_weights) <= 0):
            raise ValueError(f"StreamConfig.head_weights: non-negative, not all 0, got {self.head_weights}")


@dataclass(frozen=True)
class StreamResult:
    eval_index: np.ndarray  # [M] indices (into the stream) of the evaluated examples, clicks in [b_0, b_K)
    probs: np.ndarray  # [M] served-head probability of each evaluated example
    trained: int  # examples trained during the stream (after Pretrain)


# ------------------------------------------------------------------------------------------------ batches
class StreamTensors:
    """The stream's id columns as tensors on one device (built once, indexed per mini-batch)."""

    def __init__(self, data: StreamData, device: torch.device):
        def copy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:  # a copy: the arrays may be read-only views
            return torch.tensor(np.asarray(a), dtype=dtype, device=device)

        self.users = copy(data.users, torch.long)
        self.items = copy(data.items, torch.long)
        self.features = copy(data.features, torch.long)
        self.click = copy(data.click, torch.long)
        self.dense = copy(np.zeros((len(data), 0), np.float32) if data.dense is None else data.dense, torch.float32)
        h, n = data.history, len(data)
        empty = np.zeros((n, 0), np.int64)
        self.hist_items = copy(empty if h is None else h.items, torch.long)
        self.hist_actions = copy(empty if h is None else h.actions, torch.long)
        self.hist_times = copy(empty if h is None else h.times, torch.long)
        self.hist_lengths = copy(np.zeros(n, np.int64) if h is None else h.lengths, torch.long)
        self.device = device


def make_batch(t: StreamTensors, idx: np.ndarray, labels: np.ndarray | None = None, weights: np.ndarray | None = None
               ) -> RankingBatch:  # fmt: skip
    """Rows ``idx`` as a RankingBatch: one candidate per row, the stream's history (empty when it has none);
    labels / weights [n, T] or None."""
    i = torch.as_tensor(idx, dtype=torch.long, device=t.device)
    b = i.shape[0]
    lengths = t.hist_lengths[i]  # [b]
    L = int(lengths.max()) if b else 0  # trim the padding columns no row of this batch uses
    as3 = (lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=t.device).unsqueeze(1))
    return RankingBatch(user_ids=t.users[i], hist_items=t.hist_items[i, :L], hist_actions=t.hist_actions[i, :L],
                        hist_times=t.hist_times[i, :L], hist_lengths=lengths,
                        cand_items=t.items[i].unsqueeze(1), cand_times=t.click[i].unsqueeze(1),
                        cand_mask=torch.ones(b, 1, dtype=torch.bool, device=t.device),
                        user_features=t.features[i], dense_features=t.dense[i].unsqueeze(1),
                        labels=as3(labels), label_weights=as3(weights))  # fmt: skip


@torch.no_grad()
def predict(model: nn.Module, t: StreamTensors, idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """[n] probability of the last (longest-window) task for rows ``idx``."""
    model.eval()
    out = [torch.sigmoid(model(make_batch(t, idx[s:s + batch_size]))[:, 0, -1].double()).cpu().numpy()
           for s in range(0, idx.size, batch_size)]  # fmt: skip
    return np.concatenate(out) if out else np.zeros(0)


def _train_rows(model: nn.Module, optimizer: torch.optim.Optimizer, t: StreamTensors, rows: np.ndarray, plan: TrainingPlan,
                head_weights: torch.Tensor, batch_size: int, passes: int, rng: np.random.Generator,
                torch_seed: int) -> None:  # fmt: skip
    """``passes`` shuffled passes over ``rows``; the model's own randomness (dropout) is drawn from a torch RNG
    seeded with ``torch_seed`` inside a forked RNG state, so runs repeat and the global state is left alone."""
    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(torch_seed)
        _train_passes(model, optimizer, t, rows, plan, head_weights, batch_size, passes, rng)


def _train_passes(model: nn.Module, optimizer: torch.optim.Optimizer, t: StreamTensors, rows: np.ndarray,
                  plan: TrainingPlan, head_weights: torch.Tensor, batch_size: int, passes: int,
                  rng: np.random.Generator) -> None:  # fmt: skip
    model.train()
    tasks = model.schema.tasks
    for _ in range(passes):
        order = rows[rng.permutation(rows.size)]
        for s in range(0, order.size, batch_size):
            idx = order[s:s + batch_size]
            _, per_task = model.loss(make_batch(t, idx, plan.labels[idx], plan.weights[idx]))
            loss = sum(head_weights[k] * per_task[name] for k, name in enumerate(tasks))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _torch_seed(seed: int, step: int) -> int:
    """The torch seed of one training call (``step`` = boundary index, or -1 - epoch for pretraining)."""
    return int(np.random.default_rng([seed, 1 << 21, step + (1 << 20)]).integers(1 << 62))


def _head_weights(weights: Sequence[float] | None, num_tasks: int, device: torch.device) -> torch.Tensor:
    w = torch.full((num_tasks,), 1.0 / num_tasks) if weights is None else torch.tensor(weights, dtype=torch.float32)
    if w.shape != (num_tasks,):
        raise ValueError(f"head_weights: {w.numel()} weights for {num_tasks} tasks")
    return (w / w.sum()).to(device)


# ------------------------------------------------------------------------------------------------ the loop
def pretrain(model_factory: Callable[[RankingSchema], nn.Module], data: StreamData, plan: TrainingPlan,
             config: StreamConfig) -> tuple[nn.Module, torch.optim.Optimizer]:  # fmt: skip
    """The shared Pretrain model and its Adam state: the model built under ``torch.manual_seed(config.seed)`` (in a
    forked RNG, so no global state changes), trained ``pretrain_epochs`` epochs on the plan's examples (every head
    weighted by ``config.head_weights``)."""
    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = model_factory(data.schema).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rows = plan.at(0)
    t = StreamTensors(data, device)
    hw = _head_weights(config.head_weights, data.schema.num_tasks, device)
    for epoch in range(config.pretrain_epochs):
        _train_rows(model, optimizer, t, rows, plan, hw, config.batch_size, 1,
                    np.random.default_rng([config.seed, 1 << 20, epoch]), _torch_seed(config.seed, -1 - epoch))
    return model, optimizer


def run_stream(pretrained: tuple[nn.Module, torch.optim.Optimizer] | None, data: StreamData, boundaries: np.ndarray,
               plan: TrainingPlan | None, config: StreamConfig, head_weights: Sequence[float] | None = None
               ) -> StreamResult:  # fmt: skip
    """Stream the segments of ``boundaries`` from a copy of ``pretrained`` (model, optimizer); ``plan`` None
    evaluates the pretrained model without training (the Pretrain row). ``head_weights`` (λ) default: one-hot on the
    last task; pass the routing probabilities for window heads."""
    if pretrained is None:
        raise ValueError("run_stream needs the pretrained (model, optimizer) from pretrain()")
    device = torch.device(config.device)
    model = copy.deepcopy(pretrained[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    optimizer.load_state_dict(copy.deepcopy(pretrained[1].state_dict()))
    T = data.schema.num_tasks
    hw = _head_weights(head_weights if head_weights is not None else [0.0] * (T - 1) + [1.0], T, device)
    t = StreamTensors(data, device)
    seg = segment_of(data.click, boundaries)
    K = boundaries.size - 1
    eval_index = np.flatnonzero((seg >= 0) & (seg < K))
    probs = np.zeros(eval_index.size)
    starts = np.searchsorted(seg[eval_index], np.arange(K + 1))  # eval rows of segment k: starts[k]:starts[k+1]
    trained = 0
    for k in range(K):
        if plan is not None:
            rows = plan.at(k)
            if rows.size:
                _train_rows(model, optimizer, t, rows, plan, hw, config.batch_size, config.passes,
                            np.random.default_rng([config.seed, k]), _torch_seed(config.seed, k))
                trained += rows.size
        lo, hi = starts[k], starts[k + 1]
        probs[lo:hi] = predict(model, t, eval_index[lo:hi])
    return StreamResult(eval_index, probs, trained)


def true_labels(data: StreamData, idx: np.ndarray, longest_s: int) -> np.ndarray:
    """[n] 0/1 evaluation labels: converted within the longest window."""
    return window_labels(data.click[idx], data.convert[idx], longest_s).astype(np.float64)


# ------------------------------------------------------------------------------------------------ metrics
def stream_metrics(probs, labels) -> dict[str, float]:
    """AUC, PR-AUC, log loss and calibration (Σ p / Σ y) of one set of predictions."""
    from_counts = resampled_stream_metrics(probs, labels, np.zeros(len(labels), np.int64), np.ones((1, 1), np.int64))
    return {name: float(v[0]) for name, v in from_counts.items()}


def resampled_stream_metrics(probs, labels, user_ids, counts: np.ndarray, chunk: int = 64,
                             eps: float = 1e-7) -> dict[str, np.ndarray]:  # fmt: skip
    """Each metric on each user resample: ``counts [R, U]`` multiplicities of the sorted unique users (as
    :func:`genrec.eval.ranking_metrics.bootstrap_user_counts` draws them) -> {metric: [R]}.

    A user drawn k times counts k times; AUC comes from ``genrec.eval.ranking_metrics.resampled_auc`` (exact), the
    others from per-user sums (log loss, calibration) or ``genrec.eval.ranking_metrics.resampled_average_precision``
    (PR-AUC). Resamples are processed
    ``chunk`` at a time to bound memory.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64)
    _, uidx = np.unique(np.asarray(user_ids), return_inverse=True)
    uidx = uidx.reshape(-1)
    U = int(uidx.max()) + 1 if uidx.size else 0
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != U:
        raise ValueError(f"counts: expected [R, {U}], got shape {counts.shape}")
    q = np.clip(p, eps, 1.0 - eps)
    ll = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
    per_user = np.stack([np.bincount(uidx, weights=x, minlength=U) for x in (np.ones_like(p), y, p, ll)])  # [4, U]
    n_u, pos_u, p_u, ll_u = (counts.astype(np.float64) @ per_user.T).T  # each [R]
    aucs = []
    for s in range(0, counts.shape[0], chunk):
        c = counts[s:s + chunk]
        aucs.append(resampled_auc(p, y, uidx, c) if 0 < y.sum() < y.size else np.full(c.shape[0], np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"auc": np.concatenate(aucs), "pr_auc": resampled_average_precision(p, y, uidx, counts, chunk),
                "log_loss": ll_u / n_u, "calibration": p_u / pos_u}  # fmt: skip

