"""Blocked ("fused") HSTU attention for CPU: forward and backward tile by tile, FlashAttention-style.

Paper: Zhai et al., ICML 2024, §3.1 (pointwise aggregated attention) and §5 (fused ragged attention kernels; the
reference ships them in Triton/CUDA, ``ops/triton/triton_hstu_attention.py``). This is a CPU version of the same
idea. The math is that of the plain reference ``genrec.ops.hstu_math.hstu_attention`` with the bias of
``genrec.ops.hstu_math.relative_bias``::

    out_i  = (1 / norm) · Σ_{j <= i} SiLU(q_i·k_j + rab_ij) · v_j
    rab_ij = pos_w[i - j] + ts_w[bucket(query_time_i - t_j)]      (time term only in rows that have timestamps)

The plain path builds B·h·N² scores, adds an N² bias and masks half of it. Here the work runs over the causal tiles
of ``genrec.ops.block_layout`` (blocks of ``block`` positions, tiles in chunks, bucket ids once per batch); this
module holds the engines that run them. Backward recomputes each tile's scores (only q, k, v are saved) and uses
ATen's fused ``silu_backward``.

Deviations from the plain path (none in the math):
- Summation order differs (per tile), so fp32 results agree to ~1e-6, not bitwise.
- In a padded batch, query positions past a row's length give 0 instead of the plain path's values there (which
  the encoder multiplies by 0 anyway); ``lengths=None`` computes every row of the padded width.
- Low precision (bf16): scores, SiLU and the tile matmuls run in the input dtype; outputs and all gradients are
  accumulated in fp32 across tiles and cast back at the end (FlashAttention's choice).
- Memory: besides O(N) tensors, ``TileBuckets`` keeps one bucket id per causal pair of the batch (int64 while that
  is at most 64 MB, uint8 beyond): O(N²) bytes but shared by all heads and layers, where the plain path builds
  B·N² int64 bucket and index tensors plus h·B·N² scores.

Three engines, one result (parity-tested against each other and the plain path):

1. Chunks with PyTorch elementwise passes (``native=False``; the reference, and what runs without the native
   library): per chunk of tiles, batched matmuls (ATen / MKL) and between them the bias gather and add, SiLU, the
   causal mask, SiLU backward and the bias gradients (a sum over heads, the position tile, a bincount over time
   buckets), in ``_Tiles.weights`` / ``weights_and_grads``.
2. Chunks with the fused C passes (bf16, or fp32 with ``loop=False``): the same matmuls, with the elementwise passes
   as one fused pass forward and one backward in ``hstu_tiles.c`` (built by ``genrec.ops.native``; SiLU evaluated
   in fp32 also for bf16 scores).
3. The whole tile loop in C (fp32, the default when the library and an exported BLAS ``sgemm`` are available): each
   chunk above costs ~10 ATen calls, and a diagonal tile's masked half is computed and thrown away (6% of all tile
   products at one 4096 sequence in blocks of 256). ``genrec_attn_forward`` / ``genrec_attn_backward`` run every
   tile in one call per pass, calling the BLAS ``sgemm`` that PyTorch's CPU library exports (MKL in the x86 wheels)
   on the same per-tile products, with the same fused elementwise rows. Diagonal tiles run in row panels of
   ``loop_panel(block)`` rows that only compute the key columns up to their last row; the position bias is read from
   ``pos_w`` itself and its gradient summed into a [P] vector (no [nδ, Bs, Bs] tiles); one head at a time per tile;
   tiles grouped by key block, torch's OpenMP threads splitting the heads (or the groups). Padded batches whose
   length is a multiple of the block are read in place (``_Tiles.rows``). bf16 scores keep engine 2 (the exported
   BLAS has no bf16 GEMM with a bf16 result). ``bench/speed.py --sections attention`` compares the engines.

Why not ``torch.compile``: Inductor can fuse the elementwise chain around the extern bmm calls, which is what the C
passes already do, at the price of a compile per shape (seconds each) and a C++ toolchain; its compiled chunk
bodies measured no faster than the eager engine (figures in docs/performance.md).

Scope: CPU tensors (the layout's index tensors live on the CPU); on GPU use the plain path. The native kernel runs
on torch's OpenMP threads when it was built with OpenMP (``genrec.ops.native``).

Public: ``blocked_hstu_attention`` (padded [B, h, N, d] in and out: the plain path's contract, with the bias given
by its weights and timestamps) and ``blocked_attention`` (the engine on a ``BlockLayout``, used by
``genrec.ops.jagged``); the tiling names of ``genrec.ops.block_layout`` are re-exported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genrec.ops import native as native_mod
from genrec.ops.block_layout import (
    DEFAULT_TILE_ELEMS,
    BlockLayout,
    TileBuckets,
    TileChunk,
    block_layout,
    choose_block,
    loop_panel,
)

__all__ = [
    "DEFAULT_TILE_ELEMS",
    "BlockLayout",
    "TileBuckets",
    "TileChunk",
    "block_layout",
    "blocked_attention",
    "blocked_hstu_attention",
    "choose_block",
    "loop_panel",
    "native_lib",
]

_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # score dtypes the native kernel handles (its dtype code)


def _rows(x: torch.Tensor, ids: torch.Tensor, span) -> torch.Tensor:
    return x[span[0] : span[1]] if span is not None else x.index_select(0, ids)


def _bmm_operands(a: torch.Tensor, b: torch.Tensor, ta: bool, tb: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, h, ., .] operands as 3-D views for one bmm, transposed as asked (views: no operand is copied, where
    torch.matmul on 4-D transposed views copies them)."""
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.reshape(-1, *b.shape[-2:])
    return (a3.transpose(1, 2) if ta else a3), (b3.transpose(1, 2) if tb else b3)


def _mm(a: torch.Tensor, b: torch.Tensor, ta: bool = False, tb: bool = False, buf: torch.Tensor | None = None):
    """Batched a @ b over [C, h, ., .] (optionally transposed) as one bmm. ``buf``: a contiguous buffer with at
    least as many elements as the result, written instead of allocating."""
    a3, b3 = _bmm_operands(a, b, ta, tb)
    if buf is None:
        out = torch.bmm(a3, b3)
    else:
        out = torch.bmm(a3, b3, out=buf[: a3.shape[0] * a3.shape[1] * b3.shape[2]].view(a3.shape[0], a3.shape[1], -1))
    return out.view(*a.shape[:-2], out.shape[-2], out.shape[-1])


def _add_rows(acc: torch.Tensor, ids: torch.Tensor, span, val: torch.Tensor) -> None:
    if span is not None:
        acc[span[0] : span[1]].add_(val)
    else:
        acc.index_add_(0, ids, val.to(acc.dtype))


def _use_loop(lib, dtype: torch.dtype, loop: bool | None) -> bool:
    """Whether the C tile loop runs: fp32, the native kernel loaded and PyTorch's BLAS sgemm found, and not
    ``loop=False``. ``loop=True`` where it cannot run raises."""
    ok = loop is not False and lib is not None and dtype == torch.float32 and getattr(lib, "has_sgemm", False)
    if loop and not ok:
        raise RuntimeError("loop=True needs fp32 inputs and the native kernel with a BLAS sgemm")
    return ok


class _Tiles:
    """Per-call state shared by forward and backward: the layout, the bias tiles and the triangular mask."""

    def __init__(self, layout: BlockLayout, pos_w, ts_w, buckets: TileBuckets | None, dtype, lib=None,
                 loop: bool | None = None) -> None:
        self.layout, self.buckets = layout, buckets
        Bs = layout.block
        self.has_pos = pos_w is not None
        self.ts_pad = F.pad(ts_w.detach(), (0, 1)) if (ts_w is not None and buckets is not None) else None
        # The native kernel (genrec/ops/hstu_tiles.c) replaces the elementwise passes for fp32 / bf16 scores.
        self.lib = lib if dtype in _NATIVE_DTYPES else None
        # fp32 with the BLAS sgemm found: the whole tile loop runs in C (``loop_forward`` / ``loop_backward``)
        self.loop = _use_loop(self.lib, dtype, loop)
        self.tril = self.pos_tiles = self.offsets = None
        if self.lib is not None and self.ts_pad is not None:  # the C code reads fp32 time weights
            self.ts_pad = self.ts_pad.to(torch.float32).contiguous()
        if self.loop:
            # Where each block's rows are, for the C loop: (qbase [nblk], vbase [nblk], qhs, qrs, vhs, vrs): head h,
            # row r of block b is element qbase[b] + h·qhs + r·qrs of q / k (vbase ... of v / out); None: the
            # engine's [nblk, H, Bs, d] blocks. ``blocked_hstu_attention`` reads padded batches in place with it.
            self.rows = None
            self.pos_vec = pos_w.detach().to(torch.float32).contiguous() if pos_w is not None else None
            return
        self.tril = torch.ones(Bs, Bs, dtype=dtype).tril_()
        if pos_w is not None:
            rc = torch.arange(Bs).view(Bs, 1) - torch.arange(Bs).view(1, Bs)  # [Bs, Bs] r - c
            deltas = torch.arange(layout.num_deltas).view(-1, 1, 1) * Bs
            # [nδ, Bs, Bs] offset i - j of every tile at distance δ; the clamp only touches masked / padded slots
            self.offsets = (deltas + rc).clamp_(0, pos_w.shape[0] - 1)
            self.pos_tiles = pos_w.detach()[self.offsets]
        if self.lib is not None:
            if self.pos_tiles is not None:
                self.pos_tiles = self.pos_tiles.to(torch.float32).contiguous()
            # score buffers reused by every chunk (s, and dL/dw in backward) instead of a fresh allocation per bmm
            most = max((len(c.qi) for c in layout.chunks), default=0)
            self.bufs = None
            self._buf_elems = most * Bs * Bs

    def _loop_args(self, q, k, v, norm) -> native_mod.AttnArgs:
        """The C loop's arguments common to forward and backward (the tile list is built once per layout)."""
        qi, ki, delta, _, gstart = self.layout.key_groups
        ptr = self.buckets.loop_addresses if self.ts_pad is not None else None
        pos = self.pos_vec
        Bs, H, dk, dv = self.layout.block, q.shape[-3], q.shape[-1], v.shape[-1]
        if self.rows is None:  # the engine's own [nblk, H, Bs, d] blocks
            blk = torch.arange(q.shape[0]) * (H * Bs)
            self.rows = (blk * dk, blk * dv, Bs * dk, dk, Bs * dv, dv)
        qbase, vbase, qhs, qrs, vhs, vrs = self.rows
        return native_mod.AttnArgs(
            q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), norm=norm.data_ptr(),
            pos=pos.data_ptr() if pos is not None else None,
            ts=self.ts_pad.data_ptr() if self.ts_pad is not None else None,
            qi=qi.data_ptr(), ki=ki.data_ptr(), delta=delta.data_ptr(),
            bucket=ptr.data_ptr() if ptr is not None else None, gstart=gstart.data_ptr(),
            qbase=qbase.data_ptr(), vbase=vbase.data_ptr(), qhs=qhs, qrs=qrs, vhs=vhs, vrs=vrs,
            qnumel=q.numel(), vnumel=v.numel(), ngroups=len(gstart) - 1, H=H, B=Bs, dim_qk=dk, dim_v=dv,
            P=pos.shape[0] if pos is not None else 1, nts=self.ts_pad.numel() if self.ts_pad is not None else 0,
            bucket_dtype=0 if ptr is None or self.buckets.chunks[0].dtype == torch.long else 1,
            panel=loop_panel(Bs))

    def loop_forward(self, q, k, v, norm, out) -> None:
        """out += Σ_tiles w · v / norm (fp32, contiguous; norm [nblk]), in one C call."""
        if not self.layout.chunks:
            return
        args = self._loop_args(q, k, v, norm)
        args.out = out.data_ptr()
        self.lib.attn_forward(args)

    def loop_backward(self, q, k, v, norm, grad_out, dq, dk, dv, dpos, dts) -> None:
        """dq, dk, dv (fp32) += the tiles' gradients for dL/d(out) = grad_out; dpos [P] / dts [num_buckets + 2] +=
        the bias gradients (either may be None), in one C call."""
        if not self.layout.chunks:
            return
        args = self._loop_args(q, k, v, norm)
        args.go, args.dq, args.dk, args.dv = grad_out.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
        args.dpos = dpos.data_ptr() if dpos is not None else None
        args.dts = dts.data_ptr() if dts is not None else None
        self.lib.attn_backward(args)

    def _native(self, n: int, c: TileChunk, s: torch.Tensor, dw=None, dpos=None, dts=None) -> None:
        """Run the kernel on chunk n in place: forward (dw None: s <- w) or backward (s <- w, dw <- ds, bias
        gradients added into dpos / dts). The kernel splits large chunks across torch's OpenMP threads itself: a
        second (Python) thread pool would compete with torch's for the same cores."""
        b = self.buckets.chunks[n] if self.ts_pad is not None else None
        bwd = dw is not None
        self.lib.tile_pass(native_mod.TileArgs(
            s=s.data_ptr(), dw=dw.data_ptr() if bwd else None,
            pos=self.pos_tiles[c.delta].data_ptr() if self.pos_tiles is not None else None,
            bucket=b.data_ptr() if b is not None else None, ts=self.ts_pad.data_ptr() if b is not None else None,
            dpos=dpos.data_ptr() if bwd and dpos is not None else None,
            dts=dts.data_ptr() if bwd and dts is not None and b is not None else None,
            C=s.shape[0], dtype=_NATIVE_DTYPES[s.dtype], H=s.shape[1], B=s.shape[2],
            bucket_dtype=0 if (b is None or b.dtype == torch.long) else 1,
            nts=self.ts_pad.numel() if b is not None else 0, diag=int(c.delta == 0)))

    def _buf(self, i: int, like: torch.Tensor, numel: int | None = None) -> torch.Tensor:
        """Reusable buffer i of ``like``'s dtype for the native path (0: scores / w, 1: dL/dw / ds, 2: a product
        added into an accumulator), at least ``numel`` elements (default: the largest chunk's scores). Writing
        matmul results into reused memory instead of fresh allocations saves the page faults (and zero-filling) of a
        new buffer per product, a large share of a small product's time."""
        numel = self._buf_elems * like.shape[1] if numel is None else numel
        if self.bufs is None:
            self.bufs = [None, None, None]
        if self.bufs[i] is None or self.bufs[i].numel() < numel or self.bufs[i].dtype != like.dtype:
            self.bufs[i] = torch.empty(numel, dtype=like.dtype)
        return self.bufs[i]

    def add_mm(self, acc: torch.Tensor, ids: torch.Tensor, span, a: torch.Tensor, b: torch.Tensor,
               ta: bool = False, tb: bool = False) -> None:
        """acc[rows] += a @ b (batched over [C, h], optionally transposed), rows given by ``ids`` / ``span``."""
        if self.lib is None:
            _add_rows(acc, ids, span, _mm(a, b, ta, tb))
            return
        if span is not None and acc.dtype == a.dtype:  # accumulate in place: one gemm with beta = 1
            a3, b3 = _bmm_operands(a, b, ta, tb)
            acc[span[0] : span[1]].view(-1, a3.shape[1], b3.shape[2]).baddbmm_(a3, b3)
            return
        rows = a.shape[-1] if ta else a.shape[-2]
        cols = b.shape[-2] if tb else b.shape[-1]
        val = _mm(a, b, ta, tb, buf=self._buf(2, a, a.shape[0] * a.shape[1] * rows * cols))
        _add_rows(acc, ids, span, val)

    def weights(self, n: int, c: TileChunk, q, k):
        """w = SiLU(q kᵀ + rab), causally masked: [C, h, Bs, Bs] in q's dtype, plus the gathered q and k rows."""
        if self.lib is None:
            s, qb, kb = self.scores(n, c, q, k)
            w = F.silu(s, inplace=True)
            if c.delta == 0:
                w.mul_(self.tril)
            return w, qb, kb
        s, qb, kb = self._raw_scores(c, q, k)
        self._native(n, c, s)
        return s, qb, kb

    def _raw_scores(self, c: TileChunk, q, k):
        """Native path: q kᵀ (no bias) into score buffer 0, plus the gathered q and k rows."""
        qb = _rows(q, c.qi, c.q_span)
        kb = _rows(k, c.ki, c.k_span)
        return _mm(qb, kb, tb=True, buf=self._buf(0, q)), qb, kb

    def weights_and_grads(self, n: int, c: TileChunk, q, k, dw_fn, dpos, dts):
        """Backward of one chunk: (w, ds, qb, kb) with ds = dL/d(scores) from dw = dL/dw = ``dw_fn(buffer or None)``;
        adds the chunk's bias gradients into ``dpos`` [Bs, Bs] and ``dts`` [num_buckets + 2] (either may be None)."""
        if self.lib is None:
            s, qb, kb = self.scores(n, c, q, k)
            w = F.silu(s)
            if c.delta == 0:
                w.mul_(self.tril)
            dw = dw_fn(None)
            ds = torch.ops.aten.silu_backward.default(dw, s)
            if c.delta == 0:
                ds.mul_(self.tril)
            if dpos is not None or dts is not None:
                drab = ds.sum(1, dtype=torch.float32)  # [C, Bs, Bs]: the bias is shared by the heads
                if dpos is not None:
                    dpos.add_(drab.sum(0))
                if dts is not None:
                    dts += torch.bincount(self.buckets.chunks[n].view(-1), weights=drab.view(-1), minlength=len(dts))
            return w, ds, qb, kb
        s, qb, kb = self._raw_scores(c, q, k)
        dw = dw_fn(self._buf(1, q))
        self._native(n, c, s, dw, dpos, dts)
        return s, dw, qb, kb

    def scores(self, n: int, c: TileChunk, q, k):  # q, k must be contiguous
        """S = q kᵀ + rab for chunk n: [C, h, Bs, Bs] in q's dtype, plus the gathered q and k rows."""
        qb = _rows(q, c.qi, c.q_span)  # [C, h, Bs, dqk]
        kb = _rows(k, c.ki, c.k_span)
        s = _mm(qb, kb, tb=True)  # [C, h, Bs, Bs]
        rab = None
        if self.ts_pad is not None:
            rab = self.ts_pad.take(self.buckets.chunks[n].long())  # [C, Bs, Bs] (.long() is free for int64 ids)
            if self.pos_tiles is not None:
                rab.add_(self.pos_tiles[c.delta])
        elif self.pos_tiles is not None:
            rab = self.pos_tiles[c.delta].unsqueeze(0)  # [1, Bs, Bs]
        if rab is not None:
            s.add_(rab.unsqueeze(1))
        return s, qb, kb


class _BlockedAttention(torch.autograd.Function):
    """Forward and backward over the tile list; saves q, k, v and the normaliser for backward, nothing N².
    pos_w / ts_w are the bias weights (empty placeholders when a term is off) so that autograd routes their
    gradients; their values are read through ``tiles``."""

    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, norm, tiles: _Tiles):
        # q, k [nblk, h, Bs, dqk]; v [nblk, h, Bs, dv]; norm [nblk] fp32 -> out [nblk, h, Bs, dv]
        out = torch.zeros(v.shape, dtype=torch.float32)
        if tiles.loop:
            tiles.loop_forward(q, k, v, norm.contiguous(), out)  # divides by norm itself
        else:
            for n, c in enumerate(tiles.layout.chunks):
                w, _, _ = tiles.weights(n, c, q, k)  # [C, h, Bs, Bs]
                tiles.add_mm(out, c.qi, c.q_span, w, _rows(v, c.ki, c.k_span))
            out.div_(norm.view(-1, 1, 1, 1))
        tiles.bufs = None  # not held until backward (which reallocates them)
        ctx.tiles = tiles
        ctx.pos_len, ctx.pos_dtype, ctx.ts_dtype = pos_w.shape[0], pos_w.dtype, ts_w.dtype
        ctx.save_for_backward(q, k, v, norm)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, norm = ctx.saved_tensors
        tiles: _Tiles = ctx.tiles
        layout = tiles.layout
        if tiles.loop:  # the C loop divides by norm itself
            go = grad_out.to(torch.float32).contiguous()
        else:
            go = (grad_out.float() / norm.view(-1, 1, 1, 1)).to(q.dtype).contiguous()  # [nblk, h, Bs, dv]
        dq = torch.zeros(q.shape, dtype=torch.float32)
        dk = torch.zeros(k.shape, dtype=torch.float32)
        dv = torch.zeros(v.shape, dtype=torch.float32)
        want_pos = tiles.has_pos and ctx.needs_input_grad[3]
        want_ts = tiles.ts_pad is not None and ctx.needs_input_grad[4]
        dts = torch.zeros(tiles.ts_pad.shape[0]) if want_ts else None
        dpos = dts_out = None
        if tiles.loop:
            dpos = torch.zeros(ctx.pos_len) if want_pos else None
            tiles.loop_backward(q, k, v, norm.contiguous(), go, dq, dk, dv, dpos, dts)
        else:
            dpos_tiles = torch.zeros(layout.num_deltas, layout.block, layout.block) if want_pos else None
            for n, c in enumerate(layout.chunks):
                gob = _rows(go, c.qi, c.q_span)  # [C, h, Bs, dv]
                w, ds, qb, kb = tiles.weights_and_grads(  # scores recomputed; ds [C, h, Bs, Bs]
                    n, c, q, k, lambda buf: _mm(gob, _rows(v, c.ki, c.k_span), tb=True, buf=buf),
                    dpos_tiles[c.delta] if want_pos else None, dts if want_ts else None,
                )
                tiles.add_mm(dv, c.ki, c.k_span, w, gob, ta=True)
                tiles.add_mm(dq, c.qi, c.q_span, ds, kb)
                tiles.add_mm(dk, c.ki, c.k_span, ds, qb, ta=True)
            if want_pos:
                dpos = torch.zeros(ctx.pos_len).index_add_(0, tiles.offsets.view(-1), dpos_tiles.view(-1))
        if want_pos:
            dpos = dpos.to(ctx.pos_dtype)
        if want_ts:
            dts_out = dts[:-1].to(ctx.ts_dtype)  # the last entry is the no-time slot, not a weight
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpos, dts_out, None, None


def native_lib(native: bool | None):
    """The native kernel library for ``native`` (None: when it builds here, False: never -> None, True: required,
    RuntimeError when it is unavailable)."""
    if native is False:
        return None
    lib = native_mod.load()
    if lib is None and native:
        raise RuntimeError("native=True but the native HSTU kernel is unavailable (see the genrec.native log)")
    return lib


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    norm: torch.Tensor,
    pos_w: torch.Tensor | None = None,
    ts_w: torch.Tensor | None = None,
    buckets: TileBuckets | None = None,
    native: bool | None = None,
    loop: bool | None = None,
) -> torch.Tensor:
    """The engine. q, k [nblk, h, Bs, dqk], v [nblk, h, Bs, dv] laid out as ``layout``; norm [nblk] (normaliser of
    each block's sequence); pos_w [P] (None: no position term); ts_w [num_buckets + 1] with ``buckets`` (None: no
    time term) -> out [nblk, h, Bs, dv]. Slots that no tile reads as a query (padding blocks) give 0.

    native: None = use the fused C kernel (``genrec.ops.native``) for fp32 / bf16 when it builds here, False = the
    pure-PyTorch passes (the reference), True = require the kernel (RuntimeError when it is unavailable).
    loop: None = with the kernel, fp32 runs the whole tile loop in C when PyTorch's BLAS sgemm was found, False =
    the chunked engine, True = require the C loop (RuntimeError for bf16 or without the kernel or sgemm)."""
    if q.device.type != "cpu":
        raise NotImplementedError("blocked_attention runs on CPU tensors; use the plain path on other devices")
    q, k, v = q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    return _apply(q, k, v, norm, pos_w, ts_w, _Tiles(layout, pos_w, ts_w, buckets, q.dtype, native_lib(native), loop))


def _apply(q, k, v, norm, pos_w, ts_w, tiles: _Tiles) -> torch.Tensor:
    pos_in = pos_w if pos_w is not None else torch.zeros(0)
    ts_in = ts_w if tiles.ts_pad is not None else torch.zeros(0)
    with torch.autocast("cpu", enabled=False):  # compute in the inputs' dtype, under autocast too
        return _BlockedAttention.apply(q, k, v, pos_in, ts_in, norm.to(torch.float32), tiles)


def blocked_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_w: torch.Tensor | None,
    ts_w: torch.Tensor | None,
    timestamps: torch.Tensor | None,
    query_times: torch.Tensor | None,
    has_time: torch.Tensor | None,
    num_buckets: int,
    norm: torch.Tensor,
    lengths: torch.Tensor | None = None,
    block: int | None = None,
    tile_elems: int = DEFAULT_TILE_ELEMS,
    native: bool | None = None,
    loop: bool | None = None,
) -> torch.Tensor:
    """Padded-batch entry point with the plain path's result::

        hstu_attention(q, k, v, rab, causal, norm)   with   rab = relative_bias(pos_w, ts_w, offsets, rab_index(...))

    q, k [B, h, N, dqk]; v [B, h, N, dv]; pos_w [P >= N] (a layer's ``rab.pos_w``; None = no position term);
    ts_w [num_buckets + 1] (``.ts_w``; None = no time term); timestamps, query_times [B, N] long; has_time [B] bool;
    norm [B or 1]; lengths [B] (None = every row is N long); block (None: ``choose_block``); native, loop: as
    ``blocked_attention`` -> out [B, h, N, dv].
    """
    B, h, N, _ = q.shape
    if lengths is not None:
        lengths = lengths.to(torch.long).cpu()
    if block is None:
        block = choose_block(lengths if lengths is not None else [N] * B, h, q.shape[-1], tile_elems)
    dv = v.shape[-1]
    Np = math.ceil(N / block) * block
    nbr = Np // block  # blocks per row
    given_lengths = lengths is not None
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.long)
    layout = block_layout(lengths, block, h, torch.arange(B) * nbr, B * nbr, tile_elems)

    def blocks(x):  # [B, h, N, d] -> [B·nbr, h, Bs, d]
        x = F.pad(x, (0, 0, 0, Np - N)) if Np > N else x
        x = x.reshape(B, h, nbr, block, x.shape[-1]).transpose(1, 2)
        return x.contiguous().view(B * nbr, h, block, x.shape[-1])

    lib = native_lib(native)
    buckets = None
    if ts_w is not None and has_time is not None:
        slot_t = F.pad(timestamps, (0, Np - N)).reshape(B * nbr, block)
        slot_qt = F.pad(query_times, (0, Np - N)).reshape(B * nbr, block)
        buckets = TileBuckets.build(layout, slot_t, slot_qt, has_time.repeat_interleave(nbr), num_buckets, lib)
    norm_blk = norm.to(torch.float32).expand(B).repeat_interleave(nbr)  # [B·nbr]
    if Np == N and q.device.type == "cpu" and _use_loop(lib, q.dtype, loop):
        # The C loop reads and writes the [B, h, N, d] batch in place: block j of row b starts at row j·block of
        # that row, so no blocked copies of q, k, v, the output or the gradients are made.
        q, k, v = q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        start = (torch.arange(B).view(B, 1) * (h * N) + torch.arange(nbr).view(1, nbr) * block).view(-1)  # rows
        tiles = _Tiles(layout, pos_w, ts_w, buckets, q.dtype, lib, loop)
        tiles.rows = (start * q.shape[-1], start * dv, N * q.shape[-1], q.shape[-1], N * dv, dv)
        out = _apply(q, k, v, norm_blk, pos_w, ts_w, tiles)
    else:
        out = blocked_attention(blocks(q), blocks(k), blocks(v), layout, norm_blk, pos_w, ts_w, buckets, native, loop)
        out = out.reshape(B, nbr, h, block, dv).transpose(1, 2).reshape(B, h, Np, dv)[:, :, :N]
    if given_lengths:  # rows past a length inside a computed block: 0, like the blocks no tile touches
        out = out * (torch.arange(N).view(1, 1, N, 1) < lengths.view(B, 1, 1, 1))
    return out
