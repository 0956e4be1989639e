"""DLRM: the deep learning recommendation model, as a multi-task ranking baseline and a plain-tensor CTR model.

Paper: M. Naumov et al., "Deep Learning Recommendation Model for Personalization and Recommendation Systems",
arXiv 1906.00091 (2019), §2-3. Reference code: facebookresearch/dlrm ``dlrm_s_pytorch.py`` (``interact_features``
with ``arch_interaction_op="dot"``); TorchRec ``torchrec.models.dlrm.DLRM`` computes the same function (tested equal
in ``tests/models/test_dlrm.py`` when TorchRec is installed).

Core (:class:`DLRM`, plain tensors; serves Criteo DAC directly: dense [N, 13], sparse [N, 26]):

    x₀            = BottomMLP(dense)                          [N, d]    ReLU after every layer, the last has width d
    eₛ            = Σ_k w_sk · Table_s[id_sk]                  [N, d]    one table per sparse feature s (a bag of ids,
                                                                         weights w; a single id is a bag of one)
    Z             = [x₀, e₁, …, e_S]                           [N, S+1, d]
    I             = (Z Zᵀ)[i, j] for i > j                     [N, (S+1)S/2]  strict lower triangle, row-major
                                                                         ((1,0), (2,0), (2,1), …), as the reference
    logits        = Heads(TopMLP([x₀, I]))                     [N, T]    ReLU after every hidden top layer; one
                                                                         linear head per task on the shared top

Ranking adapter (:class:`DLRMRanker`, :class:`~genrec.data.ranking_batch.RankingBatch` -> [B, C, T] logits). Each
real candidate is one DLRM example whose sparse features are, in this order:

    candidate item id, user id, each user feature, the history as one pooled bag of item ids

and whose dense input is ``batch.dense_features[b, c]``. The history bag has its own table (one table per sparse
feature, as the paper) and is pooled as the mean of the real history items' embeddings (``history_pooling="mean"``)
or as an action-weighted mean (``"action_weighted"``): event e gets weight Σ_{a set in e's bitmask} softplus(θ_a)
(softplus(θ_none) for an event with no action bit), θ learned and initialised to weight 1, weights normalised to sum
to 1 over the row's history. An empty history pools to the zero vector. Event and candidate times are not read:
time-aware signals (recency, hour, ...) reach DLRM through the dense features.

Initialisation follows the reference: tables U(±sqrt(1 / rows)); linear layers keep nn.Linear's default, except
that the ranker's output biases start at logit(base rate) of each task when ``task_base_rates`` is given.

Deliberate deviations:
- Multi-task: T heads (one nn.Linear with T outputs, i.e. T independent linear heads) on a shared top MLP; the paper
  has one sigmoid output. Outputs are logits; the sigmoid lives in the loss.
- With no dense features (Dd = 0) the bottom MLP reads one constant input 1, so x₀ is a learned constant vector
  that still takes part in the interaction.
- Tables are plain ``nn.Embedding`` lookups, bags pooled by a weighted sum over the bag axis, instead of TorchRec's
  sharded collections (the model is meant for single-device baselines; on CPU this is also far faster than
  ``nn.EmbeddingBag`` for the one-id bags of Criteo-style features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.ranking_floors import (
    check_task_weights,
    init_output_biases,
    multitask_loss_terms,
    real_candidates,
    scatter_candidates,
)

__all__ = ["DLRM", "DLRMConfig", "DLRMRanker", "DLRMRankerConfig", "dot_interaction", "mlp"]

HISTORY_POOLINGS = ("mean", "action_weighted")


def mlp(in_dim: int, sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU, last_activation: bool = True
        ) -> nn.Sequential:  # fmt: skip
    """Linear layers of the given widths, ``activation()`` after each (after the last one only if
    ``last_activation``). Empty ``sizes`` gives the identity."""
    layers: list[nn.Module] = []
    for i, width in enumerate(sizes):
        layers.append(nn.Linear(in_dim, width))
        if last_activation or i < len(sizes) - 1:
            layers.append(activation())
        in_dim = width
    return nn.Sequential(*layers)


def dot_interaction(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise dot products of K vectors, strict lower triangle in row-major order.

    vectors [N, K, d] -> [N, K(K-1)/2], column for pair (i, j), i > j, at position i(i-1)/2 + j.
    """
    K = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [N, K, K]
    i, j = torch.tril_indices(K, K, offset=-1, device=vectors.device)
    return gram[:, i, j]


@dataclass
class DLRMConfig:
    dense_in: int  # Dd, dense features per example (13 for Criteo DAC; may be 0)
    sparse_sizes: tuple[int, ...]  # rows of each sparse feature's table (ids 0..rows-1); S = len
    embedding_dim: int = 16  # d, shared by all tables and the bottom MLP's output
    bottom_mlp: tuple[int, ...] = (64,)  # hidden widths; a last layer of width d is appended
    top_mlp: tuple[int, ...] = (64, 32)  # hidden widths of the shared top; T linear heads follow
    num_tasks: int = 1  # T

    def __post_init__(self) -> None:
        self.sparse_sizes = tuple(int(s) for s in self.sparse_sizes)
        self.bottom_mlp = tuple(int(s) for s in self.bottom_mlp)
        self.top_mlp = tuple(int(s) for s in self.top_mlp)
        if self.dense_in < 0 or self.embedding_dim < 1 or self.num_tasks < 1:
            raise ValueError("DLRMConfig: dense_in >= 0, embedding_dim >= 1 and num_tasks >= 1 are required")
        if not self.sparse_sizes or min(self.sparse_sizes) < 1:
            raise ValueError(f"DLRMConfig.sparse_sizes: at least one table, each with >= 1 row, got {self.sparse_sizes}")
        if any(w < 1 for w in self.bottom_mlp + self.top_mlp):
            raise ValueError("DLRMConfig: MLP widths must be >= 1")


SparseInput = torch.Tensor | Sequence[torch.Tensor]


class DLRM(nn.Module):
    """The DLRM function on plain tensors (see the module docstring).

    ``forward(dense, sparse, weights=None) -> [N, T]`` logits, where

    * dense: [N, Dd] float;
    * sparse: a [N, S] long tensor (S single-id features, e.g. Criteo's 26 hashed categoricals) or a sequence of S
      tensors, each [N] (one id) or [N, bag] (a bag of ids);
    * weights: None, or a sequence of S entries, each None (every id of the bag counts 1: sum pooling) or a float
      [N, bag] tensor of per-id weights (0 drops an id: padding; 1 / length gives mean pooling).

    Ids must lie in 0..rows-1 of their table (ValueError otherwise; 0 is an ordinary id here).
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.tables = nn.ModuleList(nn.Embedding(rows, d) for rows in config.sparse_sizes)
        for table in self.tables:
            bound = math.sqrt(1.0 / table.num_embeddings)
            nn.init.uniform_(table.weight, -bound, bound)
        self.bottom = mlp(max(config.dense_in, 1), config.bottom_mlp + (d,))  # [N, Dd] -> [N, d] (Dd = 0: [N, 1] ones)
        K = len(config.sparse_sizes) + 1
        top_in = d + K * (K - 1) // 2
        self.top = mlp(top_in, config.top_mlp)  # [N, top_in] -> [N, top_mlp[-1]]
        self.heads = nn.Linear(config.top_mlp[-1] if config.top_mlp else top_in, config.num_tasks)

    def _features(self, sparse: SparseInput, N: int) -> list[torch.Tensor]:
        """Normalise ``sparse`` to S long tensors of shape [N, bag], checking count, shape and id ranges."""
        S = len(self.config.sparse_sizes)
        if isinstance(sparse, torch.Tensor):
            if sparse.dim() != 2:
                raise ValueError(f"DLRM: a sparse tensor must be [N, S] ids, got shape {tuple(sparse.shape)}")
            sparse = list(sparse.unbind(1))
        features = list(sparse)
        if len(features) != S:
            raise ValueError(f"DLRM: {len(features)} sparse features given, the model has {S} tables")
        out = []
        for s, ids in enumerate(features):
            if ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"DLRM: sparse feature {s} must hold integer ids, got {ids.dtype}")
            if ids.dim() == 1:
                ids = ids.unsqueeze(1)
            if ids.dim() != 2 or ids.shape[0] != N:
                raise ValueError(f"DLRM: sparse feature {s} has shape {tuple(ids.shape)}, expected [{N}] or [{N}, bag]")
            out.append(ids.long())
        nonempty = [(s, ids) for s, ids in enumerate(out) if ids.numel()]
        if nonempty:  # one synchronisation for all range checks
            bounds = torch.stack([torch.stack([ids.min(), ids.max()]) for _, ids in nonempty]).tolist()
            for (s, _), (lo, hi) in zip(nonempty, bounds):
                rows = self.config.sparse_sizes[s]
                if lo < 0 or hi >= rows:
                    raise ValueError(f"DLRM: sparse feature {s} has ids in [{lo}, {hi}], its table has rows 0..{rows - 1}")
        return out

    def embed(self, sparse: SparseInput, weights: Sequence[torch.Tensor | None] | None, N: int) -> torch.Tensor:
        """Pooled embeddings of every sparse feature: [N, S, d]."""
        features = self._features(sparse, N)
        if weights is not None and len(weights) != len(features):
            raise ValueError(f"DLRM: {len(weights)} weight entries for {len(features)} sparse features")
        pooled = []
        for s, ids in enumerate(features):
            w = None if weights is None else weights[s]
            if w is not None and w.shape != ids.shape:
                raise ValueError(f"DLRM: weights of sparse feature {s} have shape {tuple(w.shape)}, ids {tuple(ids.shape)}")
            table = self.tables[s]
            if ids.shape[1] == 1 and w is None:  # one id per example
                pooled.append(table(ids[:, 0]))  # [N, d]
            elif w is None:
                pooled.append(table(ids).sum(1))  # [N, bag, d] -> [N, d]; an empty bag sums to 0
            else:
                pooled.append(torch.einsum("nb,nbd->nd", w.to(table.weight.dtype), table(ids)))  # [N, d]
        return torch.stack(pooled, dim=1)  # [N, S, d]

    def forward(
        self,
        dense: torch.Tensor,
        sparse: SparseInput,
        weights: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """[N, T] logits (see the class docstring for the inputs)."""
        if dense.dim() != 2 or dense.shape[1] != self.config.dense_in:
            raise ValueError(f"DLRM: dense must be [N, {self.config.dense_in}], got shape {tuple(dense.shape)}")
        N = dense.shape[0]
        dense = dense.to(self.heads.weight.dtype)
        if self.config.dense_in == 0:
            dense = dense.new_ones(N, 1)  # no dense features: x₀ is a learned constant
        x0 = self.bottom(dense)  # [N, d]
        emb = self.embed(sparse, weights, N)  # [N, S, d]
        z = torch.cat([x0.unsqueeze(1), emb], dim=1)  # [N, S+1, d]
        top_in = torch.cat([x0, dot_interaction(z)], dim=1)  # [N, d + (S+1)S/2]
        return self.heads(self.top(top_in))  # [N, T]


@dataclass
class DLRMRankerConfig:
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64, 32)
    history_pooling: str = "mean"  # "mean" | "action_weighted" (learned weight per action bit)
    task_weights: tuple[float, ...] | None = None  # loss weight per task (all 1 when None)
    task_base_rates: tuple[float, ...] | None = None  # initial output bias logit(rate) per task; None = nn.Linear's

    def __post_init__(self) -> None:
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ValueError(f"history_pooling must be one of {HISTORY_POOLINGS}, got {self.history_pooling!r}")


class DLRMRanker(nn.Module):
    """DLRM over a :class:`RankingBatch`: ``forward(batch) -> [B, C, T]`` logits, ``loss(batch)``.

    Sparse features (order): candidate item, user id, each user feature, history bag (see the module docstring).
    """

    def __init__(self, schema: RankingSchema, config: DLRMRankerConfig | None = None) -> None:
        super().__init__()
        config = config or DLRMRankerConfig()
        self.schema, self.config = schema, config
        self.task_weights = check_task_weights(config.task_weights, schema)
        sizes = (schema.num_items + 1, schema.num_users + 1, *(n + 1 for n in schema.user_feature_sizes),
                 schema.num_items + 1)  # fmt: skip
        self.dlrm = DLRM(
            DLRMConfig(
                dense_in=len(schema.dense_features),
                sparse_sizes=sizes,
                embedding_dim=config.embedding_dim,
                bottom_mlp=config.bottom_mlp,
                top_mlp=config.top_mlp,
                num_tasks=schema.num_tasks,
            )
        )
        init_output_biases(self.dlrm.heads, config.task_base_rates, schema)
        if config.history_pooling == "action_weighted":
            # θ for [no action, action 0, …, action A-1]; softplus(θ) = 1 at init
            self.action_theta = nn.Parameter(torch.full((schema.num_actions + 1,), math.log(math.e - 1.0)))

    def history_weights(self, batch: RankingBatch) -> torch.Tensor:
        """[B, L] pooling weights of the history events: 0 at padding, each real row's weights sum to 1."""
        L = batch.hist_items.shape[1]
        real = torch.arange(L, device=batch.hist_items.device) < batch.hist_lengths.unsqueeze(1)  # [B, L]
        if self.config.history_pooling == "mean":
            raw = real.to(self.dlrm.heads.weight.dtype)
        else:
            A = self.schema.num_actions
            shifts = torch.arange(A, device=batch.hist_actions.device)
            bits = ((batch.hist_actions.unsqueeze(-1) >> shifts) & 1).to(self.action_theta.dtype)  # [B, L, A]
            w = F.softplus(self.action_theta)  # [A + 1]
            none = (bits.sum(-1) == 0).to(w.dtype)  # [B, L]
            raw = (bits @ w[1:] + none * w[0]) * real  # [B, L]
        return raw / raw.sum(1, keepdim=True).clamp_min(1e-12)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """[B, C, T] logits; 0 at padded candidates. Labels are never read."""
        batch.validate(self.schema)
        flat, rows = real_candidates(batch)  # [N], [N]
        dense = batch.dense_features.flatten(0, 1)[flat]  # [N, D]
        hist_w = self.history_weights(batch)[rows]  # [N, L]
        sparse = [batch.cand_items.reshape(-1)[flat], batch.user_ids[rows],
                  *batch.user_features[rows].unbind(1), batch.hist_items[rows]]  # fmt: skip
        weights = [None] * (len(sparse) - 1) + [hist_w]
        logits = self.dlrm(dense, sparse, weights)  # [N, T]
        return scatter_candidates(logits, flat, batch)

    def loss(self, batch: RankingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Σ_t w_t · loss_t, {task: loss_t}), loss_t the mean BCE of task t over its labelled real candidates
        (``genrec.models.ranking_floors.multitask_loss_terms``; ``batch.label_weights`` weigh the labels)."""
        return multitask_loss_terms(self(batch), batch, self.task_weights, self.schema.tasks)
