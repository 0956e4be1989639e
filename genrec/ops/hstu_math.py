"""The HSTU layer's math as functions of tensors and weights: the one definition that the model
(``genrec.models.hstu``) and the fast paths (``genrec.ops.jagged``, ``genrec.ops.mfalcon``, ``genrec.ops.hstu_attention``)
all call.

Paper: Zhai et al., ICML 2024, §3.1; reference code: meta-recsys/generative-recommenders, research ``hstu.py``
(``SequentialTransductionUnitJagged``, ``RelativeBucketedTimeAndPositionBasedBias``). One layer::

    x̂            = input_norm(x)                                   LayerNorm, no affine, eps 1e-6
    U, V, Q, K    = split_uvqk(project(x̂, W_uvqk))                SiLU(x̂ W_uvqk), one projection, no bias
    A·V           = hstu_attention(Q, K, V, rab, mask, N)          Σ_j SiLU(q_i·k_j + rab_ij) · v_j / N, masked
    y             = gated_residual(x, U, A·V, W_o, dropout)       x + W_o · dropout(U ⊙ LayerNorm(A·V))

    rab(i, j)     = relative_bias(w_pos, w_time, i - j, rab_index(i - j, bucket_ij, has_time))
    bucket_ij     = time_buckets(query_time_i, t_j) = clamp(floor(ln(max(|Δ|, 1)) / 0.301), 0, num_buckets)

Every function takes plain tensors (and, for the output projection and dropout, callables), so a caller holding
the weights of any module with the same parameters can use them; nothing here imports a model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

EPS = 1e-6  # of every LayerNorm and of the final L2 normalisation
LOG_BUCKET_BASE = 0.301  # time buckets are floor(ln(gap) / 0.301): a new bucket every factor e^0.301 ≈ 1.35


# ------------------------------------------------------------------------------------------------- relative bias


def time_buckets(query_times: torch.Tensor, timestamps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log-bucketed time gaps. query_times [B, Nq], timestamps [B, Nk] -> buckets [B, Nq, Nk] long in
    0..num_buckets."""
    gap = (query_times.unsqueeze(2) - timestamps.unsqueeze(1)).abs().clamp(min=1).to(torch.float32)  # [B, Nq, Nk]
    return (torch.log(gap) / LOG_BUCKET_BASE).floor().clamp(0, num_buckets).long()


def rab_index(
    offsets: torch.Tensor, buckets: torch.Tensor, has_time: torch.Tensor | None, num_buckets: int
) -> torch.Tensor:
    """Flat index into the bias table of ``relative_bias``: ``offset · (num_buckets + 2) + bucket``.

    offsets (long, i - j >= 0) broadcastable to buckets; buckets [B, ...] from ``time_buckets``; has_time [B] bool
    (None: every row has timestamps) -> index of the broadcast shape. Rows without timestamps point at the table's
    last column, which carries no time weight."""
    width = num_buckets + 2
    if has_time is not None:
        timed = has_time.view(-1, *([1] * (buckets.dim() - 1)))
        buckets = torch.where(timed, buckets, torch.full_like(buckets, num_buckets + 1))
    return offsets * width + buckets


class _BucketLookup(torch.autograd.Function):
    """weights[index] with a bincount backward.

    Autograd's default backward for this gather is an accumulating index_put over every element, which is several
    times slower on CPU than one weighted bincount over the same elements. Same values, same gradient.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num = weights.shape[0]
        return weights[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        g = torch.bincount(index.reshape(-1), weights=grad.reshape(-1).float(), minlength=ctx.num)
        return g.to(grad.dtype), None


def bucket_lookup(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """weights [K], index (any shape, long in 0..K-1) -> weights[index]."""
    return _BucketLookup.apply(weights, index)


def relative_bias(
    pos_w: torch.Tensor, ts_w: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None,
    use_position: bool = True,
) -> torch.Tensor:
    """rab = w_pos[i - j] + w_time[bucket] (one scalar per query/key pair, shared by the heads).

    pos_w [max_len] (index = offset i - j); ts_w [num_buckets + 1]; offsets long, any shape; index from
    ``rab_index`` (None: no time term) -> rab of index's shape, or of offsets' shape without a time term.
    ``use_position=False`` drops the position term.

    With a time term both terms are read with one gather from the small [max_len, num_buckets + 2] table of their
    sums: one gather instead of two gathers, a mask and two adds over every pair."""
    pos = pos_w if use_position else torch.zeros_like(pos_w)
    if index is None:
        return pos[offsets]
    table = pos.unsqueeze(1) + F.pad(ts_w, (0, 1)).unsqueeze(0)  # [max_len, num_buckets + 2]
    return bucket_lookup(table.reshape(-1), index)


# ----------------------------------------------------------------------------------------------------- attention


def hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor, mask: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """Pointwise HSTU attention, the plain PyTorch reference path.

    q [B, h, Nq, d_qk]; k [B, h, Nk, d_qk]; v [B, h, Nk, d_v]; rab [B or 1, Nq, Nk]; mask float, broadcastable to
    [B, h, Nq, Nk] (1 where query i may see key j: the causal [N, N] lower triangle for a whole sequence);
    norm [B or 1] float -> out [B, h, Nq, d_v]:

        out_i = (1 / norm) · Σ_j mask_ij · SiLU(q_i·k_j + rab_ij) · v_j

    The normaliser is applied to the [.., Nq, d_v] output rather than to the Nq×Nk weights (same value, less work),
    and the adds and the mask run in place on the fresh score tensor (autograd saves q, k and the SiLU input, not
    the tensors overwritten).
    """
    scores = torch.matmul(q, k.transpose(-1, -2))  # [B, h, Nq, Nk]
    scores.add_(rab.unsqueeze(1))
    weights = F.silu(scores, inplace=not (torch.is_grad_enabled() and scores.requires_grad))
    weights.mul_(mask)
    return torch.matmul(weights, v) / norm.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------- pointwise parts


def input_norm(x: torch.Tensor) -> torch.Tensor:
    """x̂ = LayerNorm(x) over the last dimension, no affine parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def project(x_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SiLU(x̂ W): x_hat [..., d], w [d, k] (W_uvqk or a column block of it) -> [..., k]."""
    return F.silu(x_hat @ w)


def split_uvqk(t: torch.Tensor, h: int, dv: int, dqk: int) -> tuple[torch.Tensor, ...]:
    """The four column blocks U | V | Q | K of the last dimension (h·dv, h·dv, h·dqk, h·dqk): of a projection
    [..., 2h(dv + dqk)], or of the weight W_uvqk [d, 2h(dv + dqk)] itself."""
    return torch.split(t, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)


def to_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """[..., N, h·dim] -> [..., h, N, dim] (a view)."""
    return t.unflatten(-1, (h, -1)).transpose(-3, -2)


def from_heads(t: torch.Tensor) -> torch.Tensor:
    """[..., h, N, dim] -> [..., N, h·dim]."""
    return t.transpose(-3, -2).flatten(-2)


def gated_residual(
    x: torch.Tensor,
    u: torch.Tensor,
    av: torch.Tensor,
    out: Callable[[torch.Tensor], torch.Tensor],
    dropout: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """y = x + W_o · dropout(U ⊙ LayerNorm(A·V)): x [..., d]; u, av [..., h·dv]; ``out`` the output projection
    W_o (with bias), ``dropout`` the layer's dropout -> [..., d]."""
    return x + out(dropout(u * F.layer_norm(av, av.shape[-1:], eps=EPS)))


def output_normalize(x: torch.Tensor) -> torch.Tensor:
    """The encoder's output: L2-normalised along the last dimension."""
    return F.normalize(x, dim=-1, eps=EPS)


# ------------------------------------------------------------------------------------------ FuXi-α's extra parts
# The FuXi-α layer (``genrec.models.fuxi_alpha``) reuses the functions above for its projection, its semantic channel
# (``hstu_attention`` with no bias) and its time buckets; these are the parts it adds.


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, no affine parameters: x / sqrt(mean(x²) + eps)."""
    return F.rms_norm(x, x.shape[-1:], eps=EPS)


def channel_attention(weights: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A channel whose attention weights come from a relative bias alone, shared by the heads:

        out_i = Σ_j mask_ij · w_ij · v_j          (no activation, no normaliser)

    weights [B, Nq, Nk] or [Nq, Nk] (the same for every row); v [B, Nk, h·dv] (all heads at once: the weights do not
    depend on the head); mask float broadcastable to weights (1 where query i may see key j), or None when the
    weights are already zero wherever a key must not be seen -> [B, Nq, h·dv]."""
    if mask is not None:
        weights = weights * mask
    if weights.dim() == 2:  # one [Nq, Nk] matrix for every row: one matmul over all rows' values side by side
        B, Nk, F_ = v.shape
        out = weights @ v.transpose(0, 1).reshape(Nk, B * F_)  # [Nq, B·h·dv]
        return out.view(-1, B, F_).transpose(0, 1)
    return torch.matmul(weights, v)


def channel_gated_residual(
    x: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    out: Callable[[torch.Tensor], torch.Tensor],
    dropout: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """y = x + W_0 · dropout(U ⊙ RMSNorm(a)): FuXi-α's first MFFN stage. x [..., d]; u, a [..., h·c·dv] (a from
    ``interleave_channels``); ``out`` W_0 (with bias), ``dropout`` the layer's dropout -> [..., d]."""
    return x + out(dropout(u * rms_norm(a)))


def interleave_channels(channels: list[torch.Tensor], h: int) -> torch.Tensor:
    """Concatenate channel outputs head by head: c tensors [..., h·dv] -> [..., h·c·dv], laid out as
    (head 0: channel 0 | channel 1 | ...), (head 1: ...), ..."""
    return torch.stack([t.unflatten(-1, (h, -1)) for t in channels], dim=-2).flatten(-3)


def swiglu_residual(
    x: torch.Tensor,
    w1: Callable[[torch.Tensor], torch.Tensor],
    w3: Callable[[torch.Tensor], torch.Tensor],
    w2: Callable[[torch.Tensor], torch.Tensor],
    dropout: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """y = x + W2 · (SiLU(W1 z) ⊙ W3 z), z = dropout(RMSNorm(x)): the pre-norm SwiGLU feed-forward with its residual.
    x [..., d]; w1, w3: d -> hidden; w2: hidden -> d -> [..., d]."""
    z = dropout(rms_norm(x))
    return x + w2(F.silu(w1(z)) * w3(z))
