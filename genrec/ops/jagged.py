"""Jagged HSTU: a batch as values [T, ...] + offsets [B + 1], attention work ∝ Σ nᵢ² instead of B·max(n)².

Paper: Zhai et al., ICML 2024, §5 ("raggified" attention as grouped GEMMs over jagged sequences, 2-5x throughput);
reference code: ``generative_recommenders/research/modeling/sequential/hstu.py`` (``SequentialTransductionUnitJagged``
works on jagged values + ``x_offsets``). Sequence s holds ``values[offsets[s] : offsets[s + 1]]``, oldest first.

How the work is cut: every layer's pointwise parts (layer norms, the U/V/Q/K projection, the output projection) run
on the T real tokens only, with no padding rows. Attention packs each sequence into ``ceil(nᵢ / block)`` blocks
back to back and runs the blocked engine of ``genrec.ops.hstu_attention`` over the causal tiles of each sequence:
Σᵢ ceil(nᵢ/block)·(ceil(nᵢ/block) + 1)/2 tiles, i.e. Σ nᵢ²/2 pairs up to block rounding, where a padded batch costs
B·max(n)². Each sequence wastes at most ``block - 1`` slots.

Same outputs as the padded path (``HSTU.encode``), tested to 1e-5 in fp32, including the relative bias (position
and time terms) and rows without timestamps. Deviations: none in the math; ``jagged_encode`` applies the encoder's
dropout rates to [T, ·] tensors with ``genrec.ops.dropout`` (one counter-based stream, computed by the native kernel
when it loads and bit for bit by its PyTorch twin otherwise, so the masks do not depend on the kernel), so in
training mode the random masks differ from the padded path's ``nn.Dropout`` (same distribution).

Public: ``lengths_to_offsets``, ``padded_to_jagged``, ``jagged_to_padded``, ``JaggedBlocks`` / ``jagged_blocks``,
``jagged_hstu_attention`` (+ the per-sequence plain reference ``jagged_hstu_attention_reference``),
``to_blocks`` / ``to_blocks_split`` / ``split_uvqk`` / ``from_blocks``, ``jagged_hstu_layer``, ``jagged_encode`` and
``jagged_encode_batch`` (padded ``Batch`` in and out, a drop-in for ``HSTU.encode``).

Devices: the blocked engine and its native kernels run on CPU. ``jagged_attention_engine`` picks the engine for a
device: "blocked" on CPU; "triton" on CUDA when Triton is installed (``genrec.ops.triton_hstu``: the paper's §5 kernel,
jagged and causal with the relative bias, forward and backward, on the flat [T, h, d] values, no blocks); "padded"
otherwise, i.e. the model's plain PyTorch path. ``jagged_encode(engine="triton" | "reference")`` runs the flat
layer (``flat_hstu_layer``: the same steps of ``genrec.ops.hstu_math`` around a flat attention function) on any
device; "reference" is the per-sequence plain attention, the parity baseline of both engines.

FuXi-α (``genrec.models.fuxi_alpha``) on the same layout, tested equal to its padded path: ``jagged_fuxi_context``,
``jagged_bias_channels`` (the positional and temporal channels over the causal tiles), ``jagged_fuxi_layer``,
``jagged_fuxi_encode`` and ``jagged_fuxi_encode_batch`` (a drop-in for ``FuXiAlpha.encode``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.ops.block_layout import (
    DEFAULT_TILE_ELEMS,
    BlockLayout,
    TileBuckets,
    block_layout,
    choose_block,
)
from genrec.ops.dropout import dropout
from genrec.ops.hstu_attention import _add_rows, _rows, blocked_attention, native_lib
from genrec.ops.hstu_math import (
    channel_attention,
    channel_gated_residual,
    gated_residual,
    hstu_attention,
    input_norm,
    interleave_channels,
    output_normalize,
    project,
    rab_index,
    relative_bias,
    rms_norm,
    swiglu_residual,
    time_buckets,
)
from genrec.ops.hstu_math import split_uvqk as split_uvqk_math

# ---------------------------------------------------------------------------------------------------------- layout


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """lengths [B] -> offsets [B + 1] long (offsets[0] = 0, offsets[-1] = T)."""
    return F.pad(torch.cumsum(lengths.to(torch.long), 0), (1, 0))


def padded_to_jagged(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] left-aligned rows -> values [T, ...] (row b's first lengths[b] entries, rows in order)."""
    N = x.shape[1]
    valid = torch.arange(N, device=x.device).unsqueeze(0) < lengths.to(x.device).unsqueeze(1)  # [B, N]
    return x[valid]


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """values [T, ...] -> [B, width, ...] left-aligned, zero after each row's length (width default: max length)."""
    lengths = offsets[1:] - offsets[:-1]
    B = len(lengths)
    width = int(lengths.max()) if width is None else width
    seq, pos = _token_seq_pos(offsets)
    out = values.new_zeros((B * width, *values.shape[1:]))
    return out.index_copy(0, seq * width + pos, values).view(B, width, *values.shape[1:])


def _token_seq_pos(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """offsets [B + 1] -> (sequence [T], position within its sequence [T])."""
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths)
    return seq, torch.arange(len(seq), device=offsets.device) - offsets[:-1][seq]


@dataclass(frozen=True)
class JaggedBlocks:
    """Where every token of a jagged batch sits in the blocked engine's layout (built once, reused by every layer).

    Token t (sequence ``seq[t]``, position ``pos[t]``) lives in slot ``slot[t]`` of the flat [num_blocks · block]
    slot array, i.e. block ``slot // block``, row ``slot % block``.
    """

    offsets: torch.Tensor  # [B + 1]
    lengths: torch.Tensor  # [B]
    seq: torch.Tensor  # [T]
    pos: torch.Tensor  # [T]
    slot: torch.Tensor  # [T]
    layout: BlockLayout

    @property
    def num_slots(self) -> int:
        return self.layout.num_blocks * self.layout.block


def jagged_blocks(
    offsets: torch.Tensor, block: int | None, heads: int, head_dim: int = 64, tile_elems: int = DEFAULT_TILE_ELEMS
) -> JaggedBlocks:
    """Layout of a jagged batch; block None: ``choose_block`` for these lengths."""
    lengths = offsets[1:] - offsets[:-1]
    if block is None:
        block = choose_block(lengths, heads, head_dim)
    layout = block_layout(lengths, block, heads, tile_elems=tile_elems)
    seq, pos = _token_seq_pos(offsets)
    nblk = (lengths + block - 1) // block
    first_slot = (torch.cumsum(nblk, 0) - nblk) * block  # [B]
    return JaggedBlocks(offsets, lengths, seq, pos, first_slot[seq] + pos, layout)


def to_blocks(x: torch.Tensor, jb: JaggedBlocks) -> torch.Tensor:
    """x [T, h, d] -> [num_blocks, h, block, d] (unused slots 0)."""
    _, h, d = x.shape
    flat = x.new_zeros(jb.num_slots, h, d).index_copy_(0, jb.slot, x)  # in place: no second full copy
    return flat.view(jb.layout.num_blocks, jb.layout.block, h, d).transpose(1, 2).contiguous()


def to_blocks_split(x: torch.Tensor, jb: JaggedBlocks, parts: list[tuple[int, int]]) -> list[torch.Tensor]:
    """x [T, Σ h·d] (several tensors side by side, e.g. V | Q | K) -> one [num_blocks, h, block, d] per (h, d) part,
    with a single scatter for all of them. Differentiable through autograd (the reference for ``split_uvqk``)."""
    flat = x.new_zeros(jb.num_slots, x.shape[1]).index_copy_(0, jb.slot, x)  # in place: no second full copy
    nblk, Bs = jb.layout.num_blocks, jb.layout.block
    outs, start = [], 0
    for h, d in parts:
        part = flat[:, start : start + h * d].reshape(nblk, Bs, h, d)
        outs.append(part.transpose(1, 2).contiguous())
        start += h * d
    return outs


class _SplitUVQK(torch.autograd.Function):
    """uvqk [T, h·dv | h·dv | h·dqk | h·dqk] -> U [T, h·dv] token-major, and V, Q, K [num_blocks, h, block, ·];
    with ``silu``, the input is the projection before its activation and every output gets SiLU.

    Autograd's own backward of the column slices (``uvqk[:, :a]``, and one per block part) zero-fills a full-size
    [T, 2h(dv + dqk)] gradient for every slice and adds them up; this one writes d(uvqk) once: U's gradient into its
    columns, the three block gradients gathered back to tokens with one index_select (four full-size zero-fills and
    adds per layer are a visible share of a layer's backward). With ``silu`` the activation's backward runs in place
    on that gradient instead of on a fresh [T, 2h(dv + dqk)] tensor. The forward applies F.silu to the whole
    contiguous input first: SiLU on the strided column blocks, fused into the copies, takes ATen's non-vectorised
    strided path."""

    @staticmethod
    def forward(ctx, uvqk: torch.Tensor, jb: JaggedBlocks, u_cols: int, parts: tuple[tuple[int, int], ...],
                silu: bool):  # fmt: skip
        ctx.jb, ctx.u_cols, ctx.parts, ctx.silu = jb, u_cols, parts, silu
        if silu:
            ctx.save_for_backward(uvqk)
        act = F.silu(uvqk) if silu else uvqk
        return (act[:, :u_cols].contiguous(), *to_blocks_split(act[:, u_cols:], jb, list(parts)))

    @staticmethod
    def backward(ctx, du, *dparts):
        jb, u_cols, parts = ctx.jb, ctx.u_cols, ctx.parts
        nblk, Bs = jb.layout.num_blocks, jb.layout.block
        like = next(g for g in (du, *dparts) if g is not None)
        rest = sum(h * d for h, d in parts)
        grad_blocks = like.new_empty(nblk, Bs, rest)  # the parts side by side, slot-major: [num_slots, Σ h·d]
        start = 0
        for (h, d), g in zip(parts, dparts):
            target = grad_blocks[:, :, start : start + h * d].view(nblk, Bs, h, d)
            if g is None:
                target.zero_()
            else:
                target.copy_(g.transpose(1, 2))
            start += h * d
        grad = like.new_empty(len(jb.slot), u_cols + rest)
        if du is None:
            grad[:, :u_cols].zero_()
        else:
            grad[:, :u_cols].copy_(du)
        torch.index_select(grad_blocks.view(nblk * Bs, rest), 0, jb.slot, out=grad[:, u_cols:])  # gathered in place
        if ctx.silu:
            (pre,) = ctx.saved_tensors
            torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=grad)  # elementwise: in place is safe
        return grad, None, None, None, None


def split_uvqk(
    uvqk: torch.Tensor, jb: JaggedBlocks, h: int, dv: int, dqk: int, silu: bool = False
) -> tuple[torch.Tensor, ...]:
    """uvqk [T, 2h(dv + dqk)] = U | V | Q | K -> U [T, h·dv], V [num_blocks, h, block, dv], Q, K [.., dqk]: the same
    values as slicing U and ``to_blocks_split`` of the rest, with a single-write backward (``_SplitUVQK``).
    ``silu``: uvqk is the projection before its SiLU, applied here (the same values as ``split_uvqk(F.silu(uvqk))``)."""
    return _SplitUVQK.apply(uvqk, jb, h * dv, ((h, dv), (h, dqk), (h, dqk)), silu)


def from_blocks(x: torch.Tensor, jb: JaggedBlocks) -> torch.Tensor:
    """[num_blocks, h, block, d] -> [T, h, d]."""
    nblk, h, Bs, d = x.shape
    return x.transpose(1, 2).reshape(nblk * Bs, h, d).index_select(0, jb.slot)


def _slot_values(x: torch.Tensor, jb: JaggedBlocks) -> torch.Tensor:
    """Per-token long values [T] -> [num_blocks, block] (0 in unused slots)."""
    return x.new_zeros(jb.num_slots).index_copy_(0, jb.slot, x).view(jb.layout.num_blocks, jb.layout.block)


def jagged_time_buckets(
    jb: JaggedBlocks, timestamps: torch.Tensor | None, query_times: torch.Tensor | None, has_time: torch.Tensor | None,
    num_buckets: int, native: bool | None = None,
) -> TileBuckets | None:
    """Time-bucket ids of every causal pair (computed once per batch, shared by all layers). timestamps,
    query_times [T] long; has_time [B] bool. None when no sequence has timestamps. native: as ``blocked_attention``
    (the kernel computes the ids in one pass)."""
    if timestamps is None or has_time is None or not bool(has_time.any()):
        return None
    block_time = has_time.to(torch.bool)[jb.layout.block_seq]
    return TileBuckets.build(jb.layout, _slot_values(timestamps, jb), _slot_values(query_times, jb), block_time,
                             num_buckets, native_lib(native))


def _block_norm(jb: JaggedBlocks, norm: torch.Tensor | float) -> torch.Tensor:
    """Scalar or per-sequence [B] normaliser -> per block [num_blocks] fp32."""
    norm = torch.as_tensor(norm, dtype=torch.float32)
    if norm.numel() == 1:
        return norm.reshape(1).expand(jb.layout.num_blocks)
    return norm[jb.layout.block_seq]


# ------------------------------------------------------------------------------------------------------- attention


def jagged_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    pos_w: torch.Tensor | None,
    ts_w: torch.Tensor | None,
    timestamps: torch.Tensor | None,
    query_times: torch.Tensor | None,
    has_time: torch.Tensor | None,
    num_buckets: int,
    norm: torch.Tensor | float,
    block: int | None = None,
    jb: JaggedBlocks | None = None,
    buckets: TileBuckets | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """Causal HSTU attention per sequence of a jagged batch.

    q, k [T, h, dqk]; v [T, h, dv]; offsets [B + 1]; pos_w [P >= max n] or None; ts_w [num_buckets + 1] or None;
    timestamps, query_times [T] long; has_time [B] bool; norm scalar or [B] -> out [T, h, dv], equal to running
    ``hstu_attention`` on each sequence alone. ``jb`` / ``buckets`` may be passed in to reuse them across layers.
    native: the engine's elementwise passes (``blocked_attention``: None = the C kernel when it builds here).
    """
    jb = jagged_blocks(offsets, block, q.shape[1], q.shape[2]) if jb is None else jb
    if ts_w is not None and buckets is None:
        buckets = jagged_time_buckets(jb, timestamps, query_times, has_time, num_buckets, native)
    out = blocked_attention(to_blocks(q, jb), to_blocks(k, jb), to_blocks(v, jb), jb.layout, _block_norm(jb, norm),
                            pos_w, ts_w if buckets is not None else None, buckets, native)
    return from_blocks(out, jb)


def jagged_hstu_attention_reference(
    q, k, v, offsets, pos_w, ts_w, timestamps, query_times, has_time, num_buckets, norm
) -> torch.Tensor:
    """Plain reference: one sequence at a time through ``genrec.ops.hstu_math.hstu_attention`` (same arguments as
    ``jagged_hstu_attention``). Also ∝ Σ nᵢ², but one Python iteration and full n×n scores per sequence."""
    outs = []
    norm = torch.as_tensor(norm, dtype=torch.float32, device=q.device).reshape(-1)
    for s in range(len(offsets) - 1):
        a, b = int(offsets[s]), int(offsets[s + 1])
        n = b - a
        idx = torch.arange(n, device=q.device)
        off = (idx.view(1, n, 1) - idx.view(1, 1, n)).clamp(min=0)  # [1, n, n]
        index = None
        if ts_w is not None and has_time is not None and bool(has_time[s]):
            index = rab_index(off, time_buckets(query_times[a:b].view(1, n), timestamps[a:b].view(1, n), num_buckets),
                              None, num_buckets)
        pos = pos_w if pos_w is not None else torch.zeros(n, device=q.device)
        rab = relative_bias(pos, ts_w, off, index, use_position=pos_w is not None)  # [1, n, n]
        causal = torch.ones(n, n, device=q.device).tril()
        ns = norm[s if norm.numel() > 1 else 0].view(1)
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, n, d]
        outs.append(hstu_attention(qs, ks, vs, rab, causal, ns)[0].transpose(0, 1))  # [n, h, dv]
    return torch.cat(outs, 0)


# --------------------------------------------------------------------------------------------------- layer, encoder


@dataclass
class JaggedContext:
    """What every layer of one jagged forward shares: the block layout, time buckets and per-block normaliser."""

    jb: JaggedBlocks
    buckets: TileBuckets | None
    norm: torch.Tensor  # [num_blocks] fp32
    native: bool | None = None  # ``blocked_attention``'s choice of elementwise passes (None: the C kernel if built)


def jagged_context(
    model, offsets: torch.Tensor, timestamps, query_times, has_time, block: int | None = None,
    native: bool | None = None,
) -> JaggedContext:
    """Layout, time buckets (only if the model uses the time bias and some row has timestamps) and normaliser."""
    cfg = model.config
    jb = jagged_blocks(offsets, block, cfg.num_heads, cfg.attention_dim)
    buckets = None
    if cfg.use_time_bias:
        buckets = jagged_time_buckets(jb, timestamps, query_times, has_time, cfg.num_time_buckets, native)
    if cfg.attention_norm == "max_len":
        norm = _block_norm(jb, float(cfg.max_len))
    else:
        norm = _block_norm(jb, jb.lengths.clamp(min=1).to(torch.float32))
    return JaggedContext(jb, buckets, norm, native)


ENGINES = ("blocked", "triton", "reference")


def triton_available() -> bool:
    """Whether the Triton HSTU kernel can be used here (the ``triton`` package imports)."""
    from genrec.ops import triton_hstu

    return triton_hstu.available()


def jagged_attention_engine(device: torch.device | str, has_triton: bool | None = None) -> str:
    """The engine for jagged HSTU attention on ``device``: "blocked" on CPU (the C tile engine); "triton" on CUDA
    when Triton is installed (``has_triton``: None = look); "padded" where neither runs, meaning that the caller
    should take the model's padded PyTorch path."""
    device = torch.device(device)
    if device.type == "cpu":
        return "blocked"
    if device.type == "cuda" and (triton_available() if has_triton is None else has_triton):
        return "triton"
    return "padded"


def _flat_attention(engine: str):
    if engine == "triton":
        from genrec.ops.triton_hstu import triton_jagged_hstu_attention

        return triton_jagged_hstu_attention
    if engine == "reference":
        return jagged_hstu_attention_reference
    raise ValueError(f"flat jagged attention engine must be 'triton' or 'reference', got {engine!r}")


def flat_hstu_layer(
    layer, x: torch.Tensor, offsets: torch.Tensor, timestamps, query_times, has_time, num_buckets: int,
    norm: torch.Tensor | float, attention,
) -> torch.Tensor:
    """One HSTU layer on jagged x [T, d] with a flat attention function (``triton_jagged_hstu_attention`` or
    ``jagged_hstu_attention_reference``: q, k, v [T, h, ·] and offsets, no block layout): ``HSTULayer.forward``'s
    steps, with the layer's own ``nn.Dropout``. ``layer`` as ``jagged_hstu_layer``; timestamps None = no time term."""
    T = x.shape[0]
    h, dqk, dv = layer.h, layer.dqk, layer.dv
    u, v, q, k = split_uvqk_math(project(input_norm(x), layer.uvqk), h, dv, dqk)  # [T, h·dim] each
    pos_w = layer.rab.pos_w if layer.rab.use_position else None
    ts_w = layer.rab.ts_w if timestamps is not None else None
    av = attention(q.view(T, h, dqk), k.view(T, h, dqk), v.view(T, h, dv), offsets, pos_w, ts_w, timestamps,
                   query_times, has_time, num_buckets, norm)  # [T, h, dv]  # fmt: skip
    return gated_residual(x, u, av.reshape(T, h * dv), layer.out, layer.dropout)


def _flat_encode(model, values, offsets, timestamps, query_times, has_time, num_layers, engine) -> torch.Tensor:
    """``jagged_encode``'s body for a flat engine (any device): [T, d], not normalised."""
    cfg = model.config
    lengths = offsets[1:] - offsets[:-1]
    _, pos = _token_seq_pos(offsets)
    timed = cfg.use_time_bias and timestamps is not None and bool(has_time.any())
    norm = float(cfg.max_len) if cfg.attention_norm == "max_len" else lengths.clamp(min=1).to(torch.float32)
    x = model.item_emb(values) * math.sqrt(cfg.embedding_dim) + model.pos_emb.weight[pos]  # [T, d]
    x = model.input_dropout(x)
    attention = _flat_attention(engine)
    for layer in model.layers[:num_layers]:
        x = flat_hstu_layer(layer, x, offsets, timestamps if timed else None, query_times if timed else None,
                            has_time, cfg.num_time_buckets, norm, attention)  # fmt: skip
    return x


def jagged_hstu_layer(layer, x: torch.Tensor, ctx: JaggedContext) -> torch.Tensor:
    """One HSTU layer on jagged x [T, d] -> [T, d]: ``HSTULayer.forward``'s steps (``genrec.ops.hstu_math``) with the
    projection split straight into blocks and the blocked attention engine. ``layer``: any object with the layer's
    parameters ``h``, ``dqk``, ``dv``, ``uvqk`` [d, 2h(dv + dqk)], ``out`` (W_o), ``dropout.p``, ``training`` and
    ``rab.pos_w`` / ``rab.ts_w`` / ``rab.use_position``."""
    T = x.shape[0]
    h, dqk, dv = layer.h, layer.dqk, layer.dv
    pre = input_norm(x) @ layer.uvqk  # [T, 2h(dv + dqk)] = U | V | Q | K before their SiLU
    jb = ctx.jb
    u, v, q, k = split_uvqk(pre, jb, h, dv, dqk, silu=True)  # SiLU'd: u [T, h·dv]; v, q, k [num_blocks, h, block, ·]
    pos_w = layer.rab.pos_w if layer.rab.use_position else None
    ts_w = layer.rab.ts_w if ctx.buckets is not None else None
    out = blocked_attention(q, k, v, jb.layout, ctx.norm, pos_w, ts_w, ctx.buckets, ctx.native)  # [nblk, h, Bs, dv]
    av = from_blocks(out, jb).reshape(T, h * dv)
    return gated_residual(x, u, av, layer.out, lambda t: dropout(t, layer.dropout.p, layer.training, ctx.native))


def jagged_encode(
    model,
    values: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor | None = None,
    query_times: torch.Tensor | None = None,
    has_time: torch.Tensor | None = None,
    block: int | None = None,
    num_layers: int | None = None,
    normalize: bool = True,
    engine: str = "blocked",
) -> torch.Tensor:
    """``HSTU.encode`` on a jagged batch, with ``model``'s parameters (the first ``num_layers`` layers, default all;
    ``normalize=False`` skips the final L2 normalisation). ``model``: any object with the encoder's ``config``,
    ``item_emb``, ``pos_emb``, ``input_dropout``, ``training`` and ``layers`` (see ``jagged_hstu_layer``).

    values [T] item ids (no padding); offsets [B + 1]; timestamps, query_times [T] long (as ``Batch``: the time of
    each item / of the item each position predicts); has_time [B] bool (None: True iff timestamps are given)
    -> L2-normalised [T, d]. block: attention block size (None: ``choose_block`` for these lengths). engine:
    "blocked" (CPU), or a flat engine, "triton" (CUDA) or "reference" (any device; see the module docstring).
    """
    cfg = model.config
    lengths = offsets[1:] - offsets[:-1]
    if len(lengths) and int(lengths.max()) > cfg.max_len:
        raise ValueError(f"sequence length {int(lengths.max())} exceeds max_len {cfg.max_len}")
    if has_time is None:
        has_time = torch.full((len(lengths),), timestamps is not None, dtype=torch.bool, device=offsets.device)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "blocked":
        x = _flat_encode(model, values, offsets, timestamps, query_times, has_time, num_layers, engine)
        return output_normalize(x) if normalize else x
    if values.device.type != "cpu":
        raise ValueError(f"engine='blocked' runs on CPU tensors, got {values.device} (jagged_attention_engine "
                         "picks the engine for a device)")  # fmt: skip
    ctx = jagged_context(model, offsets, timestamps, query_times, has_time, block)
    d = cfg.embedding_dim
    x = model.item_emb(values) * math.sqrt(d) + model.pos_emb.weight[ctx.jb.pos]  # [T, d]
    x = dropout(x, model.input_dropout.p, model.training, ctx.native)
    for layer in model.layers[:num_layers]:
        x = jagged_hstu_layer(layer, x, ctx)
    return output_normalize(x) if normalize else x


def jagged_pays(lengths: torch.Tensor, width: int, grad: bool) -> bool:
    """Whether ``HSTU`` with ``attention_impl="jagged"`` should run a batch of rows with ``lengths`` (padded to
    ``width``) through this jagged encoder rather than its padded path; both give the same outputs.

    With gradients (training), always for more than one row: the backward pass doubles the attention work that the
    jagged layout saves, and training batches are large. Without (serving, evaluation), the jagged layout's fixed
    cost per batch (block layout, time-bucket tiles, scatter and gather) pays only with several rows or much padding:
    jagged for 8 rows or more, or for more than 2 rows padded to over 3x their real attention pairs. The thresholds
    come from per-request timings of both paths on the ML-1M HSTU config (``bench/serve_forward.py``; figures in
    docs/performance.md)."""
    B = len(lengths)
    if B <= 1:
        return False
    if grad or B >= 8:
        return True
    real_pairs = float((lengths.to(torch.float64) ** 2).sum())
    return B > 2 and B * width**2 > 3.0 * real_pairs


def jagged_encode_batch(
    model, batch: Batch, block: int | None = None, num_layers: int | None = None, normalize: bool = True,
    engine: str = "blocked",
) -> torch.Tensor:
    """Drop-in for ``HSTU.encode(batch)``: padded ``Batch`` in, [B, N, d] out (zero rows at padding), jagged inside
    (``engine`` as ``jagged_encode``)."""
    lengths = batch.lengths
    offsets = lengths_to_offsets(lengths)
    values = padded_to_jagged(batch.item_ids, lengths)
    ts = padded_to_jagged(batch.timestamps, lengths)
    qt = padded_to_jagged(batch.query_times, lengths)
    out = jagged_encode(model, values, offsets, ts, qt, batch.has_time, block, num_layers, normalize, engine)
    return jagged_to_padded(out, offsets, batch.item_ids.shape[1])


# ------------------------------------------------------------------------------------------------------- FuXi-α
# The FuXi-α block (``genrec.models.fuxi_alpha``) on jagged values: its semantic channel is the blocked HSTU engine
# without a bias; its positional and temporal channels (Σ_j w_ij · v_j, no activation, no normaliser, weights shared
# by the heads) run over the same causal tiles in ``_BiasChannels``. Everything pointwise is ``genrec.ops.hstu_math``.


@dataclass
class JaggedFuXiContext:
    """What every FuXi-α block of one jagged forward shares.

    base: layout, per-block normaliser of the semantic channel, native choice (``jagged_context``);
    pos_index [num_deltas, block, block] long: offset i - j of every tile at block distance δ into ``pos_w`` padded
    with one zero entry (index ``max_len``: the diagonal tiles' hidden upper triangle and offsets past ``max_len``,
    which only query slots past a sequence's end reach), or None (positional channel off);
    time_index: one [C, block, block] tensor per chunk of the layout (``TileBuckets``' ids and dtype) into ``ts_w``
    padded with one zero entry (index ``num_time_buckets + 1``: rows without timestamps and the hidden upper
    triangle of diagonal tiles), or None (temporal channel off, or no row has timestamps)."""

    base: JaggedContext
    pos_index: torch.Tensor | None
    time_index: list[torch.Tensor] | None


def jagged_fuxi_context(
    model, offsets: torch.Tensor, timestamps, query_times, has_time, block: int | None = None,
    native: bool | None = None,
) -> JaggedFuXiContext:
    """``jagged_context`` plus the tile indices of the positional and temporal channels (built once per batch)."""
    cfg = model.config
    base = jagged_context(model, offsets, timestamps, query_times, has_time, block, native)
    layout = base.jb.layout
    Bs = layout.block
    hidden = ~torch.ones(Bs, Bs, dtype=torch.bool).tril()  # [Bs, Bs] key after query in a diagonal tile
    pos_index = None
    if cfg.use_position_bias:
        rc = torch.arange(Bs).view(Bs, 1) - torch.arange(Bs).view(1, Bs)  # [Bs, Bs] r - c
        off = torch.arange(layout.num_deltas).view(-1, 1, 1) * Bs + rc  # [nδ, Bs, Bs] i - j
        pos_index = off.masked_fill(off >= cfg.max_len, cfg.max_len)
        if layout.num_deltas:
            pos_index[0].masked_fill_(hidden, cfg.max_len)
    time_index = None
    if base.buckets is not None:
        nb = cfg.num_time_buckets
        time_index = [ids.masked_fill(hidden, nb + 1) if c.delta == 0 else ids
                      for c, ids in zip(layout.chunks, base.buckets.chunks)]
    return JaggedFuXiContext(base, pos_index, time_index)


def _mm_shared(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [Bs, Bs] (the same for every tile) @ x [C, Bs, F] -> [C, Bs, F], as one matmul over the tiles side by side."""
    C, Bs, width = x.shape
    return (w @ x.transpose(0, 1).reshape(Bs, C * width)).view(w.shape[0], C, width).transpose(0, 1)


class _BiasChannels(torch.autograd.Function):
    """FuXi-α's positional and temporal channels over the causal tiles of a jagged batch:

        out_i = Σ_{j <= i} table[index_ij] · v_j            (``hstu_math.channel_attention`` on each tile)

    for each channel present, with the weights read from the channel's zero-padded weight table. Saves v only; the
    backward recomputes each tile's weights, accumulates dv in place and sums the weight gradients per table entry
    (autograd through per-chunk gathers and slices would zero-fill a full-size gradient of v for every chunk)."""

    @staticmethod
    def forward(ctx, v, pos_table, ts_table, fctx: JaggedFuXiContext):
        # v [nblk, Bs, F] (all heads side by side); tables [P + 1] / [num_buckets + 2] -> out [k, nblk, Bs, F]
        layout = fctx.base.jb.layout
        use_pos, use_ts = fctx.pos_index is not None, fctx.time_index is not None
        acc = torch.promote_types(v.dtype, torch.float32)  # accumulated in fp32 (fp64 for fp64 inputs)
        out = torch.zeros(int(use_pos) + int(use_ts), *v.shape, dtype=acc)
        pos_w, ts_w = pos_table.to(v.dtype), ts_table.to(v.dtype)
        for n, c in enumerate(layout.chunks):
            vb = _rows(v, c.ki, c.k_span)  # [C, Bs, F]
            if use_pos:  # one [Bs, Bs] weight tile for every tile at this distance
                _add_rows(out[0], c.qi, c.q_span, channel_attention(pos_w[fctx.pos_index[c.delta]], vb, None))
            if use_ts:
                w = ts_w[fctx.time_index[n].long()]  # [C, Bs, Bs]
                _add_rows(out[-1], c.qi, c.q_span, channel_attention(w, vb, None))
        ctx.fctx = fctx
        ctx.save_for_backward(v, pos_table, ts_table)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        v, pos_table, ts_table = ctx.saved_tensors
        fctx: JaggedFuXiContext = ctx.fctx
        layout = fctx.base.jb.layout
        use_pos, use_ts = fctx.pos_index is not None, fctx.time_index is not None
        go = grad_out.to(v.dtype).contiguous()  # [k, nblk, Bs, F]
        pos_w, ts_w = pos_table.to(v.dtype), ts_table.to(v.dtype)
        acc = torch.promote_types(v.dtype, torch.float32)  # accumulated in fp32 (fp64 for fp64 inputs)
        dv = torch.zeros(v.shape, dtype=acc)
        dpos_tiles = torch.zeros(fctx.pos_index.shape, dtype=acc) if use_pos else None  # [nδ, Bs, Bs]
        dts = torch.zeros(ts_table.shape[0], dtype=torch.float64) if use_ts else None
        for n, c in enumerate(layout.chunks):
            vb = _rows(v, c.ki, c.k_span)  # [C, Bs, F]
            C, Bs, width = vb.shape
            if use_pos:
                gob = _rows(go[0], c.qi, c.q_span)  # [C, Bs, F]
                _add_rows(dv, c.ki, c.k_span, _mm_shared(pos_w[fctx.pos_index[c.delta]].t(), gob))
                # dL/dw summed over the chunk's tiles (they share the weights): [Bs, C·F] @ [C·F, Bs]
                g2, v2 = gob.transpose(0, 1).reshape(Bs, C * width), vb.transpose(0, 1).reshape(Bs, C * width)
                dpos_tiles[c.delta] += g2 @ v2.t()
            if use_ts:
                gob = _rows(go[-1], c.qi, c.q_span)
                idx = fctx.time_index[n].long()
                _add_rows(dv, c.ki, c.k_span, torch.bmm(ts_w[idx].transpose(1, 2), gob))
                dw = torch.bmm(gob, vb.transpose(1, 2))  # [C, Bs, Bs]
                dts += torch.bincount(idx.view(-1), weights=dw.reshape(-1).double(), minlength=len(dts))
        dpos = dts_out = None
        if use_pos and ctx.needs_input_grad[1]:
            flat = dpos_tiles.new_zeros(pos_table.shape[0]).index_add_(0, fctx.pos_index.view(-1), dpos_tiles.view(-1))
            dpos = flat.to(pos_table.dtype)
        if use_ts and ctx.needs_input_grad[2]:
            dts_out = dts.to(ts_table.dtype)
        return dv.to(v.dtype), dpos, dts_out, None


def jagged_bias_channels(
    v: torch.Tensor, pos_w: torch.Tensor | None, ts_w: torch.Tensor | None, fctx: JaggedFuXiContext
) -> list[torch.Tensor]:
    """FuXi-α's positional and temporal channels on blocked values v [nblk, Bs, F] (F = h·dv, all heads):
    [nblk, Bs, F] per channel present (positional first), equal to ``channel_attention`` on each sequence alone.
    pos_w [max_len] (None: channel off); ts_w [num_buckets + 1] (None: channel off). The temporal channel is zero
    when no row has timestamps (``fctx.time_index`` None)."""
    if pos_w is not None and fctx.pos_index is None:
        raise ValueError("positional weights given, but the context was built for a model without the channel")
    time_on = ts_w is not None and fctx.time_index is not None
    if pos_w is None and not time_on:
        return [] if ts_w is None else [torch.zeros_like(v)]
    plan = JaggedFuXiContext(fctx.base, fctx.pos_index if pos_w is not None else None,
                             fctx.time_index if time_on else None)
    pos_table = F.pad(pos_w, (0, 1)) if pos_w is not None else v.new_zeros(0)  # [max_len + 1], last entry 0
    ts_table = F.pad(ts_w, (0, 1)) if time_on else v.new_zeros(0)  # [num_buckets + 2], last entry 0
    with torch.autocast("cpu", enabled=False):  # compute in v's dtype, under autocast too
        out = _BiasChannels.apply(v.contiguous(), pos_table, ts_table, plan)  # [k, nblk, Bs, F]
    outs = list(out.unbind(0))
    if ts_w is not None and not time_on:
        outs.append(torch.zeros_like(v))
    return outs


def jagged_fuxi_layer(layer, x: torch.Tensor, ctx: JaggedFuXiContext) -> torch.Tensor:
    """One FuXi-α block on jagged x [T, d] -> [T, d]: ``FuXiAlphaLayer.forward``'s steps (``genrec.ops.hstu_math``)
    with the projection split straight into blocks, the blocked engine for the semantic channel and
    ``jagged_bias_channels`` for the others. ``layer``: any object with the block's parameters ``h``, ``dqk``,
    ``dv``, ``channels``, ``uvqk``, ``pos_w`` / ``ts_w`` (for the channels in use), ``out`` (W_0), ``w1`` / ``w3`` /
    ``w2``, ``dropout.p`` and ``training``."""
    T = x.shape[0]
    h, dqk, dv = layer.h, layer.dqk, layer.dv
    c = len(layer.channels)
    base = ctx.base
    jb = base.jb
    nblk, Bs = jb.layout.num_blocks, jb.layout.block
    pre = rms_norm(x) @ layer.uvqk  # [T, c·h·dv + h·dv + 2h·dqk] = U | V | Q | K before their SiLU
    # SiLU'd: u [T, c·h·dv]; v [nblk, 1, Bs, h·dv] (the heads side by side); q, k [nblk, h, Bs, dqk]
    u, v, q, k = _SplitUVQK.apply(pre, jb, c * h * dv, ((1, h * dv), (h, dqk), (h, dqk)), True)
    v = v.view(nblk, Bs, h * dv)
    bias = iter(jagged_bias_channels(v, getattr(layer, "pos_w", None) if "position" in layer.channels else None,
                                     getattr(layer, "ts_w", None) if "time" in layer.channels else None, ctx))
    outputs = []  # each [T, h·dv]
    for channel in layer.channels:
        if channel == "semantic":
            v_heads = v.view(nblk, Bs, h, dv).transpose(1, 2)  # [nblk, h, Bs, dv]
            out = blocked_attention(q, k, v_heads, jb.layout, base.norm, None, None, None, base.native)
            outputs.append(from_blocks(out, jb).reshape(T, h * dv))
        else:
            outputs.append(next(bias).reshape(nblk * Bs, h * dv).index_select(0, jb.slot))
    def drop(t: torch.Tensor) -> torch.Tensor:
        return dropout(t, layer.dropout.p, layer.training, base.native)

    y = channel_gated_residual(x, u, interleave_channels(outputs, h), layer.out, drop)  # MFFN stage 1
    return swiglu_residual(y, layer.w1, layer.w3, layer.w2, drop)  # MFFN stage 2


def jagged_fuxi_encode(
    model,
    values: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor | None = None,
    query_times: torch.Tensor | None = None,
    has_time: torch.Tensor | None = None,
    block: int | None = None,
    num_layers: int | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """``FuXiAlpha.encode`` on a jagged batch, with ``model``'s parameters; arguments and result as
    ``jagged_encode`` (``model``: any object with the FuXi-α encoder's ``config``, ``item_emb``, ``pos_emb``,
    ``input_dropout``, ``training`` and ``layers``, see ``jagged_fuxi_layer``)."""
    cfg = model.config
    lengths = offsets[1:] - offsets[:-1]
    if len(lengths) and int(lengths.max()) > cfg.max_len:
        raise ValueError(f"sequence length {int(lengths.max())} exceeds max_len {cfg.max_len}")
    if has_time is None:
        has_time = torch.full((len(lengths),), timestamps is not None, dtype=torch.bool)
    ctx = jagged_fuxi_context(model, offsets, timestamps, query_times, has_time, block)
    d = cfg.embedding_dim
    x = model.item_emb(values) * math.sqrt(d) + model.pos_emb.weight[ctx.base.jb.pos]  # [T, d]
    x = dropout(x, model.input_dropout.p, model.training, ctx.base.native)
    for layer in model.layers[:num_layers]:
        x = jagged_fuxi_layer(layer, x, ctx)
    return output_normalize(x) if normalize else x


def jagged_fuxi_encode_batch(
    model, batch: Batch, block: int | None = None, num_layers: int | None = None, normalize: bool = True
) -> torch.Tensor:
    """Drop-in for ``FuXiAlpha.encode(batch)``: padded ``Batch`` in, [B, N, d] out (zero rows at padding), jagged
    inside."""
    lengths = batch.lengths
    offsets = lengths_to_offsets(lengths)
    values = padded_to_jagged(batch.item_ids, lengths)
    ts = padded_to_jagged(batch.timestamps, lengths)
    qt = padded_to_jagged(batch.query_times, lengths)
    out = jagged_fuxi_encode(model, values, offsets, ts, qt, batch.has_time, block, num_layers, normalize)
    return jagged_to_padded(out, offsets, batch.item_ids.shape[1])
