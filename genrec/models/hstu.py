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
- ``encode_last`` (what evaluation and serving call) runs the last layer's attention for the last position only.
- Rows whose timestamps are unknown (``Batch.has_time`` False, e.g. ML-1M users 3000..6040 in the development copy)
  get no time term; the reference has no notion of missing timestamps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.batches import Batch


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


def time_buckets(query_times: torch.Tensor, timestamps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log-bucketed time gaps. query_times, timestamps [B, N] -> buckets [B, N(query), N(key)] long in 0..num_buckets."""
    gap = (query_times.unsqueeze(2) - timestamps.unsqueeze(1)).abs().clamp(min=1).to(torch.float32)  # [B, N, N]
    return (torch.log(gap) / 0.301).floor().clamp(0, num_buckets).long()


class _BucketLookup(torch.autograd.Function):
    """weights[buckets] with a bincount backward.

    Autograd's default backward for this gather is an accumulating index_put over B·N² elements, which is several
    times slower on CPU than one weighted bincount over the same elements. Same values, same gradient.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buckets)
        ctx.num = weights.shape[0]
        return weights[buckets]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (buckets,) = ctx.saved_tensors
        g = torch.bincount(buckets.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.num)
        return g.to(grad.dtype), None


def bucket_lookup(weights: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """weights [K], buckets (any shape, long in 0..K-1) -> weights[buckets]."""
    return _BucketLookup.apply(weights, buckets)


class HSTURelativeBias(nn.Module):
    """rab(i, j) = w_pos[i - j] + w_time[bucket_ij] (one scalar per query/key pair, shared across heads).

    Both terms are read with one gather from a small [max_len, num_time_buckets + 2] table of their sums, indexed by
    ``offset · (num_time_buckets + 2) + bucket`` (see ``rab_index``); the last column has no time weight and serves
    rows without timestamps. One gather per layer instead of two gathers, a mask and two adds over B·N² elements.
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.use_position = config.use_position_bias
        self.pos_w = nn.Parameter(torch.empty(config.max_len).normal_(0, 0.02))  # [max_len], index = offset i - j
        self.ts_w = nn.Parameter(torch.empty(config.num_time_buckets + 1).normal_(0, 0.02))  # [num_buckets + 1]

    def forward(self, offsets: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """offsets [N, N] long (i - j, clamped to >= 0); index [B, N, N] from ``rab_index`` or None (no time term)
        -> rab [B, N, N], or [1, N, N] without a time term (broadcast over the batch)."""
        pos = self.pos_w if self.use_position else torch.zeros_like(self.pos_w)
        if index is None:
            return pos[offsets].unsqueeze(0)
        table = pos.unsqueeze(1) + F.pad(self.ts_w, (0, 1)).unsqueeze(0)  # [max_len, num_buckets + 2]
        return bucket_lookup(table.reshape(-1), index)


def rab_index(offsets: torch.Tensor, buckets: torch.Tensor, has_time: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Flat index into HSTURelativeBias's table: offsets [N, N], buckets [B, N, N], has_time [B] -> [B, N, N] long.
    Rows without timestamps point at the table's last column, which carries no time weight."""
    width = num_buckets + 2
    buckets = torch.where(has_time.view(-1, 1, 1), buckets, torch.full_like(buckets, num_buckets + 1))
    return offsets.unsqueeze(0) * width + buckets


def hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor, causal: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Pointwise causal HSTU attention, the plain PyTorch reference path.

    q, k [B, h, N, d_qk]; v [B, h, N, d_v]; rab [B or 1, N, N]; causal [N, N] float (1 where j <= i, else 0);
    norm [B or 1] float -> out [B, h, N, d_v]:

        out_i = (1 / norm) · Σ_{j <= i} SiLU(q_i·k_j + rab_ij) · v_j

    The normaliser is applied to the [.., N, d_v] output rather than to the N×N weights (same value, less work), and
    the adds and the mask run in place on the fresh score tensor (autograd saves q, k and the SiLU input, not the
    tensors overwritten).
    """
    scores = torch.matmul(q, k.transpose(-1, -2))  # [B, h, N, N]
    scores.add_(rab.unsqueeze(1))
    weights = F.silu(scores, inplace=not (torch.is_grad_enabled() and scores.requires_grad))
    weights.mul_(causal)
    return torch.matmul(weights, v) / norm.view(-1, 1, 1, 1)


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
        self, x: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None, causal: torch.Tensor, norm: torch.Tensor
    ) -> torch.Tensor:
        B, N, _ = x.shape
        h, dqk, dv = self.h, self.dqk, self.dv
        uvqk = F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6) @ self.uvqk)  # [B, N, 2h(dv+dqk)]
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        q = q.view(B, N, h, dqk).transpose(1, 2)  # [B, h, N, dqk]
        k = k.view(B, N, h, dqk).transpose(1, 2)
        v = v.view(B, N, h, dv).transpose(1, 2)  # [B, h, N, dv]
        rab = self.rab(offsets, index)  # [B or 1, N, N]
        av = hstu_attention(q, k, v, rab, causal, norm).transpose(1, 2).reshape(B, N, h * dv)  # [B, N, h·dv]
        gated = u * F.layer_norm(av, av.shape[-1:], eps=1e-6)
        return x + self.out(self.dropout(gated))


class HSTU(nn.Module):
    """HSTU retrieval encoder: item sequence -> one L2-normalised user vector per position."""

    def __init__(self, config: HSTUConfig) -> None:
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
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))

    def encode(self, batch: Batch) -> torch.Tensor:
        """batch.item_ids [B, N] -> L2-normalised sequence embeddings [B, N, d] (padding rows are zero)."""
        return F.normalize(self._hidden(batch, len(self.layers)), dim=-1, eps=1e-6)

    def encode_last(self, batch: Batch) -> torch.Tensor:
        """The L2-normalised embedding at each row's last real position [B, d], all that retrieval and serving use.

        Equals ``encode(batch)[b, lengths[b] - 1]`` (tested) with less work: the last layer runs its attention for
        that one query row per sequence, O(N) instead of O(N²)."""
        x = self._hidden(batch, len(self.layers) - 1)  # [B, N, d]
        return F.normalize(self._last_row(self.layers[-1], x, batch), dim=-1, eps=1e-6)

    def _hidden(self, batch: Batch, num_layers: int) -> torch.Tensor:
        """Input embeddings then the first ``num_layers`` layers -> [B, N, d] (not normalised; padding rows zero)."""
        ids = batch.item_ids
        B, N = ids.shape
        if N > self.config.max_len:
            raise ValueError(f"sequence width {N} exceeds max_len {self.config.max_len}")
        if self.config.attention_impl == "jagged" and num_layers > 0:
            from genrec.ops.jagged import jagged_encode_batch, jagged_pays  # the fast path, tested equal to below

            # small inference batches with little padding are cheaper on the plain path (see jagged_pays)
            if jagged_pays(batch.lengths, N, torch.is_grad_enabled()):
                return jagged_encode_batch(self, batch, num_layers=num_layers, normalize=False)
        d = self.config.embedding_dim
        valid = (torch.arange(N, device=ids.device).unsqueeze(0) < batch.lengths.unsqueeze(1)).unsqueeze(-1)  # [B,N,1]
        x = self.item_emb(ids) * math.sqrt(d) + self.pos_emb.weight[:N].unsqueeze(0)
        x = self.input_dropout(x) * valid
        if num_layers == 0:
            return x
        pos = torch.arange(N, device=ids.device)
        offsets = (pos.view(N, 1) - pos.view(1, N)).clamp(min=0)  # [N, N] i - j
        index = None  # [B, N, N] into each layer's rab table, when some row has timestamps
        if self.config.use_time_bias and bool(batch.has_time.any()):
            nb = self.config.num_time_buckets
            index = rab_index(offsets, time_buckets(batch.query_times, batch.timestamps, nb), batch.has_time, nb)
        causal = torch.ones(N, N, device=ids.device).tril()  # [N, N]
        norm = self._norm(batch, x.dtype)
        for layer in self.layers[:num_layers]:
            x = layer(x, offsets, index, causal, norm) * valid
        return x

    def _norm(self, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        """The attention normaliser: [1] (max_len) or [B] (each row's length)."""
        if self.config.attention_norm == "max_len":
            return torch.full((1,), float(self.config.max_len), device=batch.lengths.device)
        return batch.lengths.clamp(min=1).to(dtype)

    def _last_row(self, layer: "HSTULayer", x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``layer`` at the last real position of every row only: x [B, N, d] (input of the layer) -> [B, d].

        Same math as ``HSTULayer.forward`` for query i = lengths - 1: keys and values of every position, the query,
        the gate U and the relative bias of that one row. Only V and K are projected at every position (U and Q at
        the last one): half the projection work of the full layer."""
        B, N, d = x.shape
        h, dqk, dv = layer.h, layer.dqk, layer.dv
        rows = torch.arange(B, device=x.device)
        last = (batch.lengths - 1).clamp(min=0)  # [B]
        w_u, w_v, w_q, w_k = torch.split(layer.uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)  # [d, ·] each
        xn = F.layer_norm(x, (d,), eps=1e-6)  # [B, N, d]
        v = F.silu(xn @ w_v).view(B, N, h, dv).transpose(1, 2)  # [B, h, N, dv]
        k = F.silu(xn @ w_k).view(B, N, h, dqk).transpose(1, 2)  # [B, h, N, dqk]
        xn_last = xn[rows, last]  # [B, d]
        u_last = F.silu(xn_last @ w_u)  # [B, h·dv]
        q = F.silu(xn_last @ w_q).view(B, h, 1, dqk)  # [B, h, 1, dqk]
        pos = torch.arange(N, device=x.device)
        offsets = (last.view(B, 1) - pos.view(1, N)).clamp(min=0)  # [B, N] i - j
        rab = layer.rab.pos_w[offsets] if layer.rab.use_position else torch.zeros(B, N, device=x.device)
        if self.config.use_time_bias and bool(batch.has_time.any()):
            qt = batch.query_times[rows, last].view(B, 1)
            buckets = time_buckets(qt, batch.timestamps, self.config.num_time_buckets)[:, 0]  # [B, N]
            rab = rab + layer.rab.ts_w[buckets] * batch.has_time.view(B, 1).to(rab.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)) + rab.view(B, 1, 1, N)  # [B, h, 1, N]
        weights = F.silu(scores) * (pos.view(1, 1, 1, N) <= last.view(B, 1, 1, 1))
        av = (torch.matmul(weights, v) / self._norm(batch, x.dtype).view(-1, 1, 1, 1)).reshape(B, h * dv)
        gated = u_last * F.layer_norm(av, (h * dv,), eps=1e-6)
        return x[rows, last] + layer.out(layer.dropout(gated))

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item embeddings for ``ids`` (any shape) or, if None, the whole table [num_items + 1, d]."""
        w = self.item_emb.weight if ids is None else self.item_emb(ids)
        return F.normalize(w, dim=-1, eps=1e-6)
