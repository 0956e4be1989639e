"""HSTU: Hierarchical Sequential Transduction Units, the retrieval encoder of generative recommenders.

Paper: J. Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations", ICML 2024 (arXiv 2402.17152), §3.1. Reference code: meta-recsys/generative-recommenders,
``generative_recommenders/research/modeling/sequential/hstu.py`` (``SequentialTransductionUnitJagged``) and
``RelativeBucketedTimeAndPositionBasedBias``. This file follows the research code's math:

    x̂            = LayerNorm(x)                                   (no affine, eps 1e-6)
    U, V, Q, K    = split(SiLU(x̂ W_uvqk))                         (one projection, SiLU on all four, no bias)
    A             = SiLU(Q Kᵀ + rab) / N  · causal mask            (no softmax, no 1/sqrt(d) scaling)
    y             = x + W_o · dropout(U ⊙ LayerNorm(A V))          (W_o with bias)
    output        = L2-normalise(x after the last layer)

    rab(i, j)     = w_pos[i - j] + w_time[bucket(query_time_i - t_j)],   shared by all heads, one per layer
    bucket(Δ)     = clamp(floor(ln(max(|Δ|, 1)) / 0.301), 0, num_time_buckets)

Input: item_embedding · sqrt(d) + learned absolute position embedding, dropout, padding zeroed.

Each line above is one function of ``genrec.ops.hstu_math`` (``input_norm``, ``project`` / ``split_uvqk``,
``hstu_attention``, ``gated_residual``, ``relative_bias`` / ``rab_index`` / ``time_buckets``); this file holds the
parameters and wires them in that order. The fast paths (``genrec.ops.jagged``, ``genrec.ops.mfalcon``) call the
same functions with the same parameters, and this padded path is their reference.

Initialisation follows the research code: item embeddings N(0, 0.02) truncated, W_uvqk N(0, 0.02), W_o
xavier-uniform with nn.Linear's default bias, rab weights N(0, 0.02), and the position embedding xavier-normal (the
reference's ``HSTU.reset_params`` overrides the preprocessor's own sqrt(1/d) init with xavier-normal on its [211, d]
table; ours is [max_len, d], so std sqrt(2 / (max_len + d)): 0.089 vs 0.088 on ML-1M).

Deliberate deviations from the reference research code (each keeps the math, changes bookkeeping):
- N in ``A / N`` is the configured maximum length (``max_len``, 200 for ML-1M) rather than the padded tensor width
  (211 = 200 + 11 unused output slots in the reference). Same constant up to 5%, and a row's output never depends on
  how much padding its batch happened to have. ``attention_norm="length"`` divides by the row's true length instead.
- The position term of rab has one weight per causal offset (max_len values) instead of 2N-1 values of which the
  non-causal half is always masked.
- ``attention_impl="jagged"`` runs the same math on jagged values (``genrec.ops.jagged``): attention work ∝ Σ nᵢ²
  instead of B·max(n)² (``bench/speed.py --sections training``: HSTU-large ML-1M steps); tested equal to this path.
  Inference batches of a few rows with little padding take the padded path instead (``genrec.ops.jagged.jagged_pays``).
  The jagged engine follows the device (``genrec.ops.jagged.jagged_attention_engine``): the blocked C engine on CPU,
  the Triton kernel (``genrec.ops.triton_hstu``, the paper's §5) on CUDA when Triton is installed, this padded path
  elsewhere.
- ``encode_last`` (what evaluation and serving call) runs the last layer's attention for the last position only.
- Rows whose timestamps are unknown (``Batch.has_time`` False, e.g. users of a sequence file read without a timestamp
  file) get no time term; the reference has no notion of missing timestamps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batches import Batch
from genrec.ops.hstu_math import (  # the layer's math, shared with the fast paths; re-exported for callers
    bucket_lookup,
    from_heads,
    gated_residual,
    hstu_attention,
    input_norm,
    output_normalize,
    project,
    rab_index,
    relative_bias,
    split_uvqk,
    time_buckets,
    to_heads,
)
from genrec.ops.jagged import jagged_attention_engine, jagged_encode_batch, jagged_pays

__all__ = ["HSTU", "HSTUConfig", "HSTULayer", "HSTURelativeBias", "bucket_lookup", "hstu_attention", "rab_index",
           "time_buckets"]


@dataclass
class HSTUConfig:
    num_items: int
    max_len: int = 200
    embedding_dim: int = 50  # d
    num_blocks: int = 2
    num_heads: int = 1  # h
    attention_dim: int = 50  # d_qk per head
    linear_dim: int = 50  # d_v per head
    dropout: float = 0.2  # on the input embeddings
    linear_dropout: float = 0.2  # on U ⊙ LN(AV)
    use_time_bias: bool = True
    use_position_bias: bool = True
    num_time_buckets: int = 128
    attention_norm: str = "max_len"  # "max_len" | "length"
    attention_impl: str = "padded"  # "padded" (this file, the reference) | "jagged" (genrec.ops.jagged, parity-tested)


def whole_item_table(item_emb: nn.Module, device: torch.device) -> torch.Tensor:
    """The whole item table [num_embeddings, d] of ``item_emb``: an ``nn.Embedding``'s weight itself, or, for a table
    module that only looks ids up (``genrec.train.sharded.ItemTable``, whose rows may be spread over processes), the
    lookup of every id on ``device`` (one differentiable lookup)."""
    if isinstance(item_emb, nn.Embedding):
        return item_emb.weight
    return item_emb(torch.arange(item_emb.num_embeddings, device=device))


class HSTURelativeBias(nn.Module):
    """rab(i, j) = w_pos[i - j] + w_time[bucket_ij], one scalar per query/key pair shared by the heads
    (``genrec.ops.hstu_math.relative_bias``)."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.use_position = config.use_position_bias
        self.pos_w = nn.Parameter(torch.empty(config.max_len).normal_(0, 0.02))  # [max_len], index = offset i - j
        self.ts_w = nn.Parameter(torch.empty(config.num_time_buckets + 1).normal_(0, 0.02))  # [num_buckets + 1]

    def forward(self, offsets: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """offsets [N, N] or [B, Nq, Nk] long (i - j, clamped to >= 0); index from ``rab_index`` or None (no time
        term) -> rab [B, Nq, Nk], or [1, N, N] for [N, N] offsets without a time term (broadcast over the batch)."""
        rab = relative_bias(self.pos_w, self.ts_w, offsets, index, self.use_position)
        return rab if rab.dim() == 3 else rab.unsqueeze(0)


class HSTULayer(nn.Module):
    """One HSTU layer: pointwise projection, spatial aggregation, pointwise transformation (paper §3.1)."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.h, self.dqk, self.dv = config.num_heads, config.attention_dim, config.linear_dim
        d = config.embedding_dim
        self.uvqk = nn.Parameter(torch.empty(d, 2 * self.h * (self.dv + self.dqk)).normal_(0, 0.02))
        self.out = nn.Linear(self.h * self.dv, d)  # bias keeps nn.Linear's U(±1/sqrt(h·dv)) init, as in the reference
        nn.init.xavier_uniform_(self.out.weight)
        self.rab = HSTURelativeBias(config)
        self.dropout = nn.Dropout(config.linear_dropout)

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None, mask: torch.Tensor, norm: torch.Tensor
    ) -> torch.Tensor:
        """x [B, N, d]; offsets, index: the relative bias's (``HSTURelativeBias.forward``); mask [N, N] float
        (causal); norm [B or 1] -> [B, N, d]."""
        u, v, q, k = split_uvqk(project(input_norm(x), self.uvqk), self.h, self.dv, self.dqk)  # [B, N, h·dim] each
        av = hstu_attention(to_heads(q, self.h), to_heads(k, self.h), to_heads(v, self.h),  # [B, h, N, dv]
                            self.rab(offsets, index), mask, norm)
        return gated_residual(x, u, from_heads(av), self.out, self.dropout)

    def forward_last(
        self, x: torch.Tensor, last: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None,
        mask: torch.Tensor, norm: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` for one query row per sequence: x [B, N, d]; last [B] the query position of each row;
        offsets, index [B, 1, N] of that row; mask [B, 1, 1, N] -> [B, d], equal to ``forward(...)[b, last[b]]``.
        Keys and values are projected at every position, the gate U and the query only at ``last``: half the
        projection work of the full layer, and O(N) attention instead of O(N²)."""
        h, dv, dqk = self.h, self.dv, self.dqk
        w_u, w_v, w_q, w_k = split_uvqk(self.uvqk, h, dv, dqk)  # column blocks [d, ·] of W_uvqk
        rows = torch.arange(x.shape[0], device=x.device)
        x_hat = input_norm(x)  # [B, N, d]
        x_hat_last = x_hat[rows, last].unsqueeze(1)  # [B, 1, d]
        q = to_heads(project(x_hat_last, w_q), h)  # [B, h, 1, dqk]
        k, v = to_heads(project(x_hat, w_k), h), to_heads(project(x_hat, w_v), h)  # [B, h, N, ·]
        av = hstu_attention(q, k, v, self.rab(offsets, index), mask, norm)  # [B, h, 1, dv]
        return gated_residual(x[rows, last], project(x_hat_last[:, 0], w_u), from_heads(av)[:, 0], self.out,
                              self.dropout)


class HSTUInputs(nn.Module):
    """What HSTU shares with its variants (``genrec.models.fuxi_alpha``): the checks of the common settings, the input
    preprocessor (item embedding · sqrt(d) + learned absolute position embedding, dropout, padding zeroed), the
    attention normaliser and the L2-normalised item vectors. Subclasses add their blocks as ``self.layers``."""

    def __init__(self, config) -> None:
        super().__init__()
        if config.attention_norm not in ("max_len", "length"):
            raise ValueError(f"attention_norm must be 'max_len' or 'length', got {config.attention_norm!r}")
        if config.attention_impl not in ("padded", "jagged"):
            raise ValueError(f"attention_impl must be 'padded' or 'jagged', got {config.attention_impl!r}")
        self.config = config
        d = config.embedding_dim
        self.item_emb = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(config.max_len, d)  # [max_len, d]
        nn.init.xavier_normal_(self.pos_emb.weight)  # std sqrt(2 / (max_len + d)), 0.089 for ML-1M
        self.input_dropout = nn.Dropout(config.dropout)

    def _embed(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, N] -> (input embeddings [B, N, d] with padding rows zero, valid [B, N, 1] bool)."""
        N = ids.shape[1]
        valid = (torch.arange(N, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)  # [B, N, 1]
        x = self.item_emb(ids) * math.sqrt(self.config.embedding_dim) + self.pos_emb.weight[:N].unsqueeze(0)
        return self.input_dropout(x) * valid, valid

    def _norm(self, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        """The attention normaliser: [1] (max_len) or [B] (each row's length)."""
        if self.config.attention_norm == "max_len":
            return torch.full((1,), float(self.config.max_len), device=batch.lengths.device)
        return batch.lengths.clamp(min=1).to(dtype)

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item embeddings for ``ids`` (any shape) or, if None, the whole table [num_items + 1, d]."""
        w = whole_item_table(self.item_emb, self.pos_emb.weight.device) if ids is None else self.item_emb(ids)
        return output_normalize(w)


class HSTU(HSTUInputs):
    """HSTU retrieval encoder: item sequence -> one L2-normalised user vector per position."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))

    def encode(self, batch: Batch) -> torch.Tensor:
        """batch.item_ids [B, N] -> L2-normalised sequence embeddings [B, N, d] (padding rows are zero)."""
        return output_normalize(self._hidden(batch, len(self.layers)))

    def encode_last(self, batch: Batch) -> torch.Tensor:
        """The L2-normalised embedding at each row's last real position [B, d], all that retrieval and serving use.

        Equals ``encode(batch)[b, lengths[b] - 1]`` (tested) with less work: the last layer runs for that one query
        row per sequence (``HSTULayer.forward_last``)."""
        x = self._hidden(batch, len(self.layers) - 1)  # [B, N, d]
        B, N, _ = x.shape
        last = (batch.lengths - 1).clamp(min=0)  # [B]
        pos = torch.arange(N, device=x.device)
        offsets = (last.view(B, 1, 1) - pos.view(1, 1, N)).clamp(min=0)  # [B, 1, N] i - j
        rows = torch.arange(B, device=x.device)
        index = self._rab_index(offsets, batch, batch.query_times[rows, last].view(B, 1))  # [B, 1, N] or None
        mask = (pos.view(1, 1, 1, N) <= last.view(B, 1, 1, 1)).to(x.dtype)  # [B, 1, 1, N]
        y = self.layers[-1].forward_last(x, last, offsets, index, mask, self._norm(batch, x.dtype))
        return output_normalize(y)

    def _hidden(self, batch: Batch, num_layers: int) -> torch.Tensor:
        """Input embeddings then the first ``num_layers`` layers -> [B, N, d] (not normalised; padding rows zero)."""
        ids = batch.item_ids
        N = ids.shape[1]
        if N > self.config.max_len:
            raise ValueError(f"sequence width {N} exceeds max_len {self.config.max_len}")
        # the fast path, tested equal to the rest of this function; small inference batches with little padding are
        # cheaper on the plain path (see jagged_pays). The engine follows the device: the blocked C engine on CPU, the
        # Triton kernel on CUDA, this padded path where neither runs (jagged_attention_engine).
        if self.config.attention_impl == "jagged" and num_layers > 0:
            engine = jagged_attention_engine(ids.device)
            if engine != "padded" and jagged_pays(batch.lengths, N, torch.is_grad_enabled()):
                return jagged_encode_batch(self, batch, num_layers=num_layers, normalize=False, engine=engine)
        x, valid = self._embed(ids, batch.lengths)  # [B, N, d], [B, N, 1]
        if num_layers == 0:
            return x
        pos = torch.arange(N, device=ids.device)
        offsets = (pos.view(N, 1) - pos.view(1, N)).clamp(min=0)  # [N, N] i - j
        index = self._rab_index(offsets, batch, batch.query_times)  # [B, N, N] or None
        causal = torch.ones(N, N, device=ids.device).tril()  # [N, N]
        norm = self._norm(batch, x.dtype)
        for layer in self.layers[:num_layers]:
            x = layer(x, offsets, index, causal, norm) * valid
        return x

    def _rab_index(self, offsets: torch.Tensor, batch: Batch, query_times: torch.Tensor) -> torch.Tensor | None:
        """Index into every layer's bias table for queries at ``query_times`` [B, Nq] against all of the batch's
        keys (offsets [Nq, Nk] or [B, Nq, Nk]); None when the time term is off or no row has timestamps."""
        if not (self.config.use_time_bias and bool(batch.has_time.any())):
            return None
        nb = self.config.num_time_buckets
        return rab_index(offsets, time_buckets(query_times, batch.timestamps, nb), batch.has_time, nb)
