"""FuXi-α: HSTU with separate semantic, temporal and positional attention channels and a multi-stage FFN.

Paper: Y. Ye et al., "FuXi-α: Scaling Recommendation Model with Feature Interaction Enhanced Transformer", WWW '25
Companion (arXiv 2502.03036), §3. Reference code: USTC-StarTeam/FuXi-alpha, ``modeling/sequential/fuxi.py``
(``FuXiBlockJagged``, ``_adaptive_multichannel_attention_maybe_from_cache``, ``MultistageFeedforwardNeuralNetwork``,
``SeperatedRelativeBucketedTimeAndPositionBasedBias``), a fork of the HSTU research code. This file follows the
reference code's math. One block, Adaptive Multi-channel Self-attention (AMS) then the Multi-stage FFN (MFFN):

    x̂             = RMSNorm(x)                                     (no affine, eps 1e-6)
    U, V, Q, K     = split(SiLU(x̂ W_uvqk))                         U is c·h·d_v wide (one slice per channel and head)
    semantic       = Σ_j SiLU(q_i·k_j) · v_j / N  · causal          (per head; HSTU's attention without rab)
    positional     = Σ_j w_pos[i - j] · v_j · causal                (weights shared by the heads, no activation, no 1/N)
    temporal       = Σ_j w_time[bucket(query_time_i - t_j)] · v_j · causal        (likewise)
    a              = concat per head (positional | temporal | semantic)             [h·c·d_v]
    x'             = x + W_0 · dropout(U ⊙ RMSNorm(a))             (MFFN stage 1: back to d, W_0 with bias)
    y              = x' + W_2 · (SiLU(W_1 z) ⊙ W_3 z),  z = dropout(RMSNorm(x'))   (stage 2: SwiGLU, no biases)
    output         = L2-normalise(x after the last block)

    bucket(Δ)      = clamp(floor(ln(max(|Δ|, 1)) / 0.301), 0, num_time_buckets)       (HSTU's time buckets)

c = 3 channels with both biases on; the SwiGLU hidden width is ``ffn_dim`` (the reference's d · ffn_multiply, with
ffn_multiply 1 in its published configs). Input: item_embedding · sqrt(d) + learned absolute position embedding,
dropout, padding zeroed, exactly as HSTU (the reference keeps HSTU's input preprocessor and output L2 norm).

The math lives in ``genrec.ops.hstu_math``: ``rms_norm``, ``project`` (SiLU(x̂ W)), ``hstu_attention`` (the
semantic channel, called with a zero bias), ``time_buckets`` / ``rab_index`` / ``bucket_lookup`` (the temporal
channel's weights, with HSTU's no-time column, which is zero, for rows without timestamps and for the keys the
causal mask hides), ``channel_attention`` (the positional and temporal channels), ``interleave_channels``,
``channel_gated_residual`` (MFFN stage 1), ``swiglu_residual`` and ``output_normalize``. The jagged fast path
(``genrec.ops.jagged``) calls the same functions with the same parameters, and this padded path is its reference.

Dropout: ``dropout`` on the input embeddings; ``linear_dropout`` on U ⊙ RMSNorm(a) before W_0 and on the normed
input of the SwiGLU stage (the reference uses its linear dropout rate in both places; its attention dropout rate is
unused there too).

Initialisation follows the reference code: W_uvqk N(0, 0.02); w_pos, w_time N(0, 0.02); W_0, W_1, W_2, W_3
xavier-uniform, W_0's bias nn.Linear's default; item embeddings N(0, 0.02) truncated and the position embedding
xavier-normal, as in ``genrec.models.hstu``.

Deliberate deviations from the reference code (the math of a block is kept):
- N in the semantic channel's ``1 / N`` is the configured ``max_len`` rather than the padded tensor width (211 for
  ML-1M in the reference), as in ``genrec.models.hstu``; ``attention_norm="length"`` divides by the row's true
  length instead. The positional and temporal channels have no normaliser, as in the reference.
- The positional weights have one value per causal offset (max_len values) instead of 2N-1 values of which the
  non-causal half is always masked.
- ``use_position_bias=False`` / ``use_time_bias=False`` remove the positional / temporal channel: it is not
  computed, and U, the RMSNorm and W_0 cover only the remaining channels (c = 2 or 1; the semantic channel is always
  there). The reference always runs the three channels.
- Rows whose timestamps are unknown (``Batch.has_time`` False) get a zero temporal channel (their weights read
  HSTU's no-time column, which is zero); the channel keeps its slot in U, the RMSNorm and W_0, so a batch can mix
  both kinds of rows. The reference has no notion of missing timestamps.
- ``encode_last`` (what evaluation and serving call) runs the last block for the last position only.
- ``attention_impl="jagged"`` runs the same math on jagged values (``genrec.ops.jagged``: the semantic channel on
  HSTU's blocked attention engine without a bias, the positional and temporal channels over the same causal tiles):
  attention work ∝ Σ nᵢ² instead of B·max(n)², and the pointwise parts on real tokens only; tested equal to this
  path (outputs and gradients). Its dropout draws other masks than ``nn.Dropout`` (same distribution). Inference
  batches of a few rows with little padding take this padded path instead (``genrec.ops.jagged.jagged_pays``), and
  so does every batch on a device other than the CPU (the jagged engine's kernels are CPU kernels).
  On the padded path, padded keys sit after every real query, so the causal mask hides them, and padded positions
  are zeroed after every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.batches import Batch
from genrec.models.hstu import HSTUInputs
from genrec.ops.hstu_math import (
    bucket_lookup,
    channel_attention,
    channel_gated_residual,
    from_heads,
    hstu_attention,
    interleave_channels,
    output_normalize,
    project,
    rab_index,
    rms_norm,
    swiglu_residual,
    time_buckets,
    to_heads,
)
from genrec.ops.jagged import (
    jagged_attention_engine,
    jagged_fuxi_encode_batch,
    jagged_pays,
)

__all__ = ["FuXiAlpha", "FuXiAlphaConfig", "FuXiAlphaLayer"]


@dataclass
class FuXiAlphaConfig:
    num_items: int
    max_len: int = 200
    embedding_dim: int = 50  # d
    num_blocks: int = 2
    num_heads: int = 1  # h
    attention_dim: int = 50  # d_qk per head
    linear_dim: int = 50  # d_v per head (each channel's output per head)
    ffn_dim: int = 50  # hidden width of the SwiGLU stage of the MFFN
    dropout: float = 0.2  # on the input embeddings
    linear_dropout: float = 0.2  # before W_0 and on the SwiGLU stage's normed input
    use_time_bias: bool = True  # the temporal channel
    use_position_bias: bool = True  # the positional channel
    num_time_buckets: int = 128
    attention_norm: str = "max_len"  # the semantic channel's 1/N: "max_len" | "length"
    attention_impl: str = "padded"  # "padded" (this file, the reference) | "jagged" (genrec.ops.jagged, parity-tested)

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels in use, in the order of the concatenation (the reference's: positional, temporal,
        semantic)."""
        return tuple(name for name, on in (("position", self.use_position_bias), ("time", self.use_time_bias),
                                           ("semantic", True)) if on)  # fmt: skip


@dataclass
class _Attend:
    """What the blocks share for one forward pass: which keys each query sees and the channels' indices.

    offsets long [N, N] or [B, 1, N] (i - j, clamped to >= 0); time_index long [B, Nq, Nk] into w_time padded with
    a zero column (rows without timestamps and keys hidden by the mask point at it), or None (temporal channel off
    or no row timed); mask float [N, N] or [B, 1, N] (causal); norm [B or 1] (the semantic channel's normaliser)."""

    offsets: torch.Tensor
    time_index: torch.Tensor | None
    mask: torch.Tensor
    norm: torch.Tensor


class FuXiAlphaLayer(nn.Module):
    """One FuXi-α block: AMS (paper §3.2) then MFFN (§3.3)."""

    def __init__(self, config: FuXiAlphaConfig) -> None:
        super().__init__()
        self.h, self.dqk, self.dv = config.num_heads, config.attention_dim, config.linear_dim
        self.channels = config.channels
        d, c, h = config.embedding_dim, len(self.channels), config.num_heads
        self.split = [c * h * self.dv, h * self.dv, h * self.dqk, h * self.dqk]  # U | V | Q | K
        self.uvqk = nn.Parameter(torch.empty(d, sum(self.split)).normal_(0, 0.02))
        if config.use_position_bias:
            self.pos_w = nn.Parameter(torch.empty(config.max_len).normal_(0, 0.02))  # [max_len], index = i - j
        if config.use_time_bias:
            self.ts_w = nn.Parameter(torch.empty(config.num_time_buckets + 1).normal_(0, 0.02))  # [num_buckets + 1]
        self.out = nn.Linear(c * h * self.dv, d)  # MFFN stage 1 (W_0), bias with nn.Linear's default init
        self.w1 = nn.Linear(d, config.ffn_dim, bias=False)  # SwiGLU gate
        self.w3 = nn.Linear(d, config.ffn_dim, bias=False)  # SwiGLU value
        self.w2 = nn.Linear(config.ffn_dim, d, bias=False)
        for lin in (self.out, self.w1, self.w2, self.w3):
            nn.init.xavier_uniform_(lin.weight)
        self.dropout = nn.Dropout(config.linear_dropout)

    def forward(self, x: torch.Tensor, ctx: _Attend, last: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, d] -> [B, N, d]; or, with ``last`` [B] (one query position per row, ``ctx`` built for it),
        [B, d] equal to ``forward(x, full_ctx)[b, last[b]]``: keys and values are projected at every position, U
        and the query only at ``last``."""
        x_hat = rms_norm(x)  # [B, N, d]
        if last is None:
            u, v, q, k = torch.split(project(x_hat, self.uvqk), self.split, dim=-1)  # [B, N, ·] each
            x_res = x
        else:
            w_u, w_v, w_q, w_k = torch.split(self.uvqk, self.split, dim=-1)  # column blocks [d, ·]
            rows = torch.arange(x.shape[0], device=x.device)
            x_hat_q = x_hat[rows, last].unsqueeze(1)  # [B, 1, d]
            u, q = project(x_hat_q, w_u), project(x_hat_q, w_q)  # [B, 1, ·]
            v, k = project(x_hat, w_v), project(x_hat, w_k)  # [B, N, ·]
            x_res = x[rows, last].unsqueeze(1)  # [B, 1, d]
        outputs = []  # each [B, Nq, h·dv]
        for channel in self.channels:
            if channel == "position":
                outputs.append(channel_attention(bucket_lookup(self.pos_w, ctx.offsets), v, ctx.mask))
            elif channel == "time":
                if ctx.time_index is None:  # no row of the batch has timestamps
                    outputs.append(v.new_zeros(v.shape[0], q.shape[1], v.shape[2]))
                else:
                    weights = bucket_lookup(F.pad(self.ts_w, (0, 1)), ctx.time_index)  # [B, Nq, Nk]
                    outputs.append(channel_attention(weights, v, None))  # hidden keys read the zero column
            else:
                zero_bias = v.new_zeros(1, 1, 1)
                av = hstu_attention(to_heads(q, self.h), to_heads(k, self.h), to_heads(v, self.h), zero_bias,
                                    ctx.mask.unsqueeze(-3), ctx.norm)  # [B, h, Nq, dv]
                outputs.append(from_heads(av))
        a = interleave_channels(outputs, self.h)  # [B, Nq, h·c·dv]
        y = channel_gated_residual(x_res, u, a, self.out, self.dropout)  # MFFN stage 1
        y = swiglu_residual(y, self.w1, self.w3, self.w2, self.dropout)  # MFFN stage 2
        return y if last is None else y[:, 0]


class FuXiAlpha(HSTUInputs):
    """FuXi-α retrieval encoder: item sequence -> one L2-normalised user vector per position (HSTU's input
    preprocessor, normaliser and item vectors: ``genrec.models.hstu.HSTUInputs``)."""

    def __init__(self, config: FuXiAlphaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(FuXiAlphaLayer(config) for _ in range(config.num_blocks))

    def encode(self, batch: Batch) -> torch.Tensor:
        """batch.item_ids [B, N] -> L2-normalised sequence embeddings [B, N, d] (padding rows are zero)."""
        return output_normalize(self._hidden(batch, len(self.layers)))

    def encode_last(self, batch: Batch) -> torch.Tensor:
        """The L2-normalised embedding at each row's last real position [B, d]; equals
        ``encode(batch)[b, lengths[b] - 1]`` (tested), with the last block run for that one query row."""
        x = self._hidden(batch, len(self.layers) - 1)  # [B, N, d]
        if not self.layers:
            rows = torch.arange(x.shape[0], device=x.device)
            return output_normalize(x[rows, (batch.lengths - 1).clamp(min=0)])
        B, N, _ = x.shape
        last = (batch.lengths - 1).clamp(min=0)  # [B]
        pos = torch.arange(N, device=x.device)
        offsets = (last.view(B, 1, 1) - pos.view(1, 1, N)).clamp(min=0)  # [B, 1, N] i - j
        rows = torch.arange(B, device=x.device)
        mask = (pos.view(1, 1, N) <= last.view(B, 1, 1)).to(x.dtype)  # [B, 1, N]
        time_index = self._time_index(batch, batch.query_times[rows, last].view(B, 1), mask.bool())
        ctx = _Attend(offsets, time_index, mask, self._norm(batch, x.dtype))
        return output_normalize(self.layers[-1](x, ctx, last))

    def _hidden(self, batch: Batch, num_layers: int) -> torch.Tensor:
        """Input embeddings then the first ``num_layers`` blocks -> [B, N, d] (not normalised; padding rows zero)."""
        ids = batch.item_ids
        N = ids.shape[1]
        if N > self.config.max_len:
            raise ValueError(f"sequence width {N} exceeds max_len {self.config.max_len}")
        # the fast path, tested equal to the rest of this function; small inference batches with little padding are
        # cheaper on the plain path (see jagged_pays). The jagged FuXi-α engine runs on CPU; other devices take this
        # padded path.
        if (self.config.attention_impl == "jagged" and num_layers > 0 and jagged_attention_engine(ids.device) == "blocked"
                and jagged_pays(batch.lengths, N, torch.is_grad_enabled())):
            return jagged_fuxi_encode_batch(self, batch, num_layers=num_layers, normalize=False)
        x, valid = self._embed(ids, batch.lengths)  # [B, N, d], [B, N, 1]
        if num_layers == 0:
            return x
        pos = torch.arange(N, device=ids.device)
        offsets = (pos.view(N, 1) - pos.view(1, N)).clamp(min=0)  # [N, N] i - j
        causal = torch.ones(N, N, device=ids.device, dtype=x.dtype).tril()  # [N, N]
        time_index = self._time_index(batch, batch.query_times, causal.bool())
        ctx = _Attend(offsets, time_index, causal, self._norm(batch, x.dtype))
        for layer in self.layers[:num_layers]:
            x = layer(x, ctx) * valid
        return x

    def _time_index(self, batch: Batch, query_times: torch.Tensor, visible: torch.Tensor) -> torch.Tensor | None:
        """Index [B, Nq, Nk] into every block's w_time padded with a zero column, for queries at ``query_times``
        [B, Nq] against all of the batch's keys; keys a query may not see (``visible`` [Nq, Nk] or [B, Nq, Nk] bool
        False) and rows without timestamps point at the zero column, so the temporal weights need no mask. None
        when the temporal channel is off or no row has timestamps."""
        if not (self.config.use_time_bias and bool(batch.has_time.any())):
            return None
        nb = self.config.num_time_buckets
        no_offset = torch.zeros((), dtype=torch.long, device=query_times.device)  # the time column alone
        index = rab_index(no_offset, time_buckets(query_times, batch.timestamps, nb), batch.has_time, nb)
        return index.masked_fill(~visible, nb + 1)
