"""Jagged causal HSTU attention as Triton GPU kernels, forward and backward.

Paper: Zhai et al., ICML 2024, §5 (attention over "raggified" sequences as fused kernels: no padding, only the causal
pairs of each sequence, the n×n scores never stored); reference code: meta-recsys/generative-recommenders,
``ops/triton/triton_hstu_attention.py``. The math is that of ``genrec.ops.hstu_math`` and the per-sequence reference
``genrec.ops.jagged.jagged_hstu_attention_reference``, whose arguments and result this module's
``triton_jagged_hstu_attention`` takes and returns. For sequence s (rows offsets[s] : offsets[s + 1]) and head h::

    out_i  = (1 / norm_s) · Σ_{j <= i, j in s} SiLU(q_i·k_j + rab_ij) · v_j
    rab_ij = pos_w[i - j]                                        (when pos_w is given)
           + ts_w[bucket(query_times_i, timestamps_j)]           (when ts_w is given and has_time[s])
    bucket = clamp(floor(ln(max(|query_times_i - timestamps_j|, 1)) / 0.301), 0, num_buckets)

Kernels (one program per (sequence, head, block of rows); every tile is a ``tl.dot`` with fp32 accumulation):

- ``_hstu_fwd``: a block of query rows walks the key blocks up to the diagonal; scores, bias, SiLU and the
  weights·V product stay in registers.
- ``_hstu_bwd_kv``: a block of key rows walks the query blocks from the diagonal down, recomputing the scores, and
  accumulates dK and dV; it also sums dScore into the bias tables (the sum over heads and pairs): per square tile,
  the diagonals i - j are summed in registers (a skewed ``tl.gather``) and the time buckets too when the tile spans
  at most ``KernelConfig.ts_window`` of them, then added to fp32 buffers with atomics.
- ``_hstu_bwd_q``: a block of query rows walks the key blocks up to the diagonal again and accumulates dQ (no
  atomics on dQ, so dQ, dK and dV are deterministic).

Head dims need not be powers of two (25, 50, ...): tiles are padded to the next power of two (at least 16, the
smallest ``tl.dot``) with masked loads; sequence lengths need not be multiples of a block.

Time buckets are exact: ``bucket_thresholds`` finds, with ``genrec.ops.hstu_math.time_buckets`` itself on the
inputs' device, the smallest integer gap of every bucket; the kernels take a bucket from ``tl.log`` and move it by at
most one to where the gap sits between two thresholds. So the ids equal the reference's for every gap, at bucket
boundaries too, whatever ``tl.log`` rounds to.

Deviations from the reference (none in the math):
- Output in the inputs' dtype. (The reference divides by an fp32 norm tensor, which promotes bf16/fp16 results to
  fp32.) With bf16/fp16 inputs the SiLU weights and dScore are cast to that dtype before their ``tl.dot`` (as in
  FlashAttention); scores, bias, SiLU and all accumulators are fp32.
- fp32 inputs: IEEE fp32 products, or TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own rule
  for fp32 matmuls).
- The bias-table gradients are fp32 atomic sums, cast to the tables' dtype: their summation order, and so their last
  bits, may change from run to run.
- No gradient for ``norm``, even when it is a tensor that requires one (the model's norm is a constant).
- No time term when ``has_time`` or ``timestamps`` is None (the reference: when ``has_time`` is None).

Tests: ``tests/ops/test_triton_hstu.py`` runs the kernels under Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors) against ``jagged_hstu_attention_reference``: outputs and the gradients of q, k, v, pos_w and ts_w in fp32
to ~1e-5 relative, over jagged batches with lengths 0, 1 and ones that are not multiples of the block, head dims 25
and dqk != dv, with and without each bias term, rows without timestamps, scalar and per-sequence norm; bucket ids
bit for bit at the bucket boundaries; fp16 inputs (the interpreter's ``tl.dot`` cannot multiply bf16 tiles, so bf16
runs only on a GPU); and the input checks. The interpreter checks the math and the masking, not compilation or speed
on a GPU.

Public: ``available``, ``triton_jagged_hstu_attention``, ``KernelConfig``, ``bucket_thresholds``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrec.ops.hstu_math import LOG_BUCKET_BASE, time_buckets

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # the kernels below stay plain Python functions, and calls say why they cannot run
    triton = tl = None
    _IMPORT_ERROR = error


def available() -> bool:
    """Whether the ``triton`` package imports here (the kernels then run on CUDA tensors, or on CPU tensors when
    ``TRITON_INTERPRET=1`` was set before this module was imported)."""
    return _IMPORT_ERROR is None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes (powers of two, at least 16) and launch options of the kernels."""

    block_m: int = 64  # query rows per program of the forward and dQ kernels
    block_n: int = 64  # key rows per step of the forward and dQ kernels
    block_kv: int = 64  # rows and columns of the square tiles of the dK / dV / bias-gradient kernel
    ts_window: int = 4  # a tile whose time buckets span at most this many ids sums them in registers
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_kv"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {size}")
        if self.ts_window < 1:
            raise ValueError(f"KernelConfig.ts_window must be >= 1, got {self.ts_window}")


# ------------------------------------------------------------------------------------------------ kernel helpers


@_jit
def _load_rows(ptr, start, rows, n, head, stride_t, stride_h, d, D: tl.constexpr):
    """Rows start + rows (those < n) of head ``head`` of a [T, h, d] tensor -> [len(rows), D], 0 beyond n and d."""
    dims = tl.arange(0, D)
    mask = (rows < n)[:, None] & (dims < d)[None, :]
    return tl.load(ptr + (start + rows)[:, None] * stride_t + head * stride_h + dims[None, :], mask=mask, other=0.0)


@_jit
def _store_rows(ptr, x, start, rows, n, head, stride_t, stride_h, d, D: tl.constexpr):
    """The inverse of ``_load_rows``: x [len(rows), D] fp32 -> rows of a [T, h, d] tensor, in its dtype."""
    dims = tl.arange(0, D)
    mask = (rows < n)[:, None] & (dims < d)[None, :]
    ptrs = ptr + (start + rows)[:, None] * stride_t + head * stride_h + dims[None, :]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


@_jit
def _time_bucket(query_time, time, thresholds, num_buckets, LOG_BASE: tl.constexpr):
    """Bucket ids of the gaps |query_time - time| (int64 tiles that broadcast) -> int32 in 0..num_buckets.

    thresholds [num_buckets + 2] int64 (``bucket_thresholds``): thresholds[b] is the smallest gap in bucket b or
    above. The log estimate is off by at most one bucket at a boundary; the two comparisons settle it."""
    gap = tl.maximum(tl.abs(query_time - time), 1)
    estimate = tl.floor(tl.log(gap.to(tl.float32)) / LOG_BASE)
    bucket = tl.minimum(tl.maximum(estimate, 0.0), num_buckets).to(tl.int32)
    bucket = tl.where(gap < tl.load(thresholds + bucket), bucket - 1, bucket)
    return tl.where(gap >= tl.load(thresholds + bucket + 1), bucket + 1, bucket)


@_jit
def _scores(q, k, rows, cols, n, timed, query_time, time, pos_w, ts_w, thresholds, num_buckets,
            HAS_POS: tl.constexpr, HAS_TS: tl.constexpr, LOG_BASE: tl.constexpr, PRECISION: tl.constexpr):
    """One tile's scores q_i·k_j + rab_ij.

    q [BM, D] and k [BN, D] in the input dtype; rows [BM], cols [BN] positions in the sequence (of length n);
    timed: whether the sequence has timestamps; query_time [BM], time [BN] int64 -> scores [BM, BN] fp32, pair
    [BM, BN] (True where j <= i < n: the causal pairs), bucket [BM, BN] int32 (0 without a time term)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    rel = rows[:, None] - cols[None, :]
    pair = (rel >= 0) & (rows < n)[:, None] & (cols < n)[None, :]
    if HAS_POS:
        s += tl.load(pos_w + rel, mask=pair, other=0.0).to(tl.float32)
    bucket = tl.zeros_like(rel)
    if HAS_TS:
        bucket = _time_bucket(query_time[:, None], time[None, :], thresholds, num_buckets, LOG_BASE)
        s += tl.load(ts_w + bucket, mask=tl.where(timed, pair, False), other=0.0).to(tl.float32)
    return s, pair, bucket


@_jit
def _add_diagonal_sums(dpos, ds, base, n, BLOCK: tl.constexpr):
    """dpos[base + r - c] += ds[r, c] for a square tile ds [BLOCK, BLOCK] (zero outside the causal pairs), with one
    atomic per diagonal. base = i0 - j0 >= 0, the offset of the tile's corner.

    skew[r, t] = ds[r, (r - t) mod BLOCK]: column t of skew holds diagonal t (where r >= t) and diagonal t - BLOCK
    (where r < t), so two column sums give all 2·BLOCK - 1 diagonals."""
    r = tl.arange(0, BLOCK)[:, None]
    t = tl.arange(0, BLOCK)[None, :]
    skew = tl.gather(ds, (r - t + BLOCK) % BLOCK, axis=1)
    upper = tl.sum(tl.where(r >= t, skew, 0.0), axis=0)  # [BLOCK]: offsets base + t
    lower = tl.sum(tl.where(r < t, skew, 0.0), axis=0)  # [BLOCK]: offsets base + t - BLOCK
    offset = base + tl.arange(0, BLOCK)
    tl.atomic_add(dpos + offset, upper, mask=offset < n, sem="relaxed")
    lower_offset = offset - BLOCK
    tl.atomic_add(dpos + lower_offset, lower, mask=(lower_offset >= 0) & (lower_offset < n), sem="relaxed")


@_jit
def _add_bucket_sums(dts, ds, bucket, live, WINDOW: tl.constexpr):
    """dts[bucket] += ds over the tile's pairs where live. A tile whose live buckets span at most WINDOW ids (most
    tiles off the diagonal: their gaps are alike) sums each id in registers first, one atomic per id; other tiles
    add pair by pair."""
    low = tl.min(tl.where(live, bucket, 2147483647))
    high = tl.max(tl.where(live, bucket, -1))
    if high - low < WINDOW:
        for w in tl.static_range(WINDOW):
            part = tl.sum(tl.where(live & (bucket == low + w), ds, 0.0))
            tl.atomic_add(dts + low + w, part, mask=low + w <= high, sem="relaxed")
    else:
        tl.atomic_add(dts + bucket, ds, mask=live, sem="relaxed")


@_jit
def _silu_grad(s, sig):
    """d SiLU(s) / ds from s and sigmoid(s)."""
    return sig * (1.0 + s * (1.0 - sig))


# ------------------------------------------------------------------------------------------------------- kernels
# Grids: (B·h, row blocks). Program (pid0, pid1) takes sequence pid0 // h, head pid0 % h. Tensors: q, k [T, h, dqk],
# v, out, d_out [T, h, dv] (last dim contiguous; row and head strides passed); offsets [B + 1] int64; timestamps,
# query_times [T] int64; has_time [B] int32; norm [B] fp32; pos_w [P]; ts_w [num_buckets + 1]; thresholds
# [num_buckets + 2] int64. Absent tables are stand-in tensors never read (HAS_POS / HAS_TS false).


@_jit
def _hstu_fwd(
    Q, K, V, OUT, offsets, timestamps, query_times, has_time, norm, pos_w, ts_w, thresholds,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    H, dqk, dv, num_buckets,
    HAS_POS: tl.constexpr, HAS_TS: tl.constexpr, LOG_BASE: tl.constexpr, PRECISION: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    i0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # last row blocks (most key blocks) launch first
    start = tl.load(offsets + seq)
    n = (tl.load(offsets + seq + 1) - start).to(tl.int32)
    if i0 >= n:
        return
    rows = i0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, start, rows, n, head, stride_qt, stride_qh, dqk, D_QK)  # [BM, D_QK]
    timed = tl.load(has_time + seq) != 0
    query_time = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_TS:
        query_time = tl.load(query_times + start + rows, mask=rows < n, other=0)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    for j0 in range(0, tl.minimum(i0 + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start, cols, n, head, stride_kt, stride_kh, dqk, D_QK)  # [BN, D_QK]
        v = _load_rows(V, start, cols, n, head, stride_vt, stride_vh, dv, D_V)  # [BN, D_V]
        time = tl.zeros([BLOCK_N], dtype=tl.int64)
        if HAS_TS:
            time = tl.load(timestamps + start + cols, mask=cols < n, other=0)
        s, pair, _ = _scores(q, k, rows, cols, n, timed, query_time, time, pos_w, ts_w, thresholds, num_buckets,
                             HAS_POS, HAS_TS, LOG_BASE, PRECISION)  # [BM, BN]
        w = tl.where(pair, s * tl.sigmoid(s), 0.0)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
    acc = acc / tl.load(norm + seq)
    _store_rows(OUT, acc, start, rows, n, head, stride_ot, stride_oh, dv, D_V)


@_jit
def _hstu_bwd_kv(
    Q, K, V, DO, DK, DV, DPOS, DTS, offsets, timestamps, query_times, has_time, norm, pos_w, ts_w, thresholds,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    H, dqk, dv, num_buckets,
    HAS_POS: tl.constexpr, HAS_TS: tl.constexpr, POS_GRAD: tl.constexpr, TS_GRAD: tl.constexpr,
    LOG_BASE: tl.constexpr, PRECISION: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK: tl.constexpr, TS_WINDOW: tl.constexpr,
):
    """dK, dV [T, h, ·] for one block of key rows, and its share of dpos [P] and dts [num_buckets + 1] (fp32)."""
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    j0 = tl.program_id(1) * BLOCK
    start = tl.load(offsets + seq)
    n = (tl.load(offsets + seq + 1) - start).to(tl.int32)
    if j0 >= n:
        return
    cols = j0 + tl.arange(0, BLOCK)
    k = _load_rows(K, start, cols, n, head, stride_kt, stride_kh, dqk, D_QK)  # [BLOCK, D_QK]
    v = _load_rows(V, start, cols, n, head, stride_vt, stride_vh, dv, D_V)  # [BLOCK, D_V]
    timed = tl.load(has_time + seq) != 0
    time = tl.zeros([BLOCK], dtype=tl.int64)
    if HAS_TS:
        time = tl.load(timestamps + start + cols, mask=cols < n, other=0)
    inv_norm = 1.0 / tl.load(norm + seq)
    dk = tl.zeros([BLOCK, D_QK], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK, D_V], dtype=tl.float32)
    for i0 in range(j0, n, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        q = _load_rows(Q, start, rows, n, head, stride_qt, stride_qh, dqk, D_QK)  # [BLOCK, D_QK]
        do = _load_rows(DO, start, rows, n, head, stride_dot, stride_doh, dv, D_V)  # [BLOCK, D_V]
        query_time = tl.zeros([BLOCK], dtype=tl.int64)
        if HAS_TS:
            query_time = tl.load(query_times + start + rows, mask=rows < n, other=0)
        s, pair, bucket = _scores(q, k, rows, cols, n, timed, query_time, time, pos_w, ts_w, thresholds,
                                  num_buckets, HAS_POS, HAS_TS, LOG_BASE, PRECISION)  # [BLOCK (i), BLOCK (j)]
        sig = tl.sigmoid(s)
        w = tl.where(pair, s * sig, 0.0)
        dv_acc += tl.dot(tl.trans(w).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * inv_norm  # d out_i · v_j / norm
        ds = tl.where(pair, dp * _silu_grad(s, sig), 0.0)  # dScore_ij
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        if POS_GRAD:
            _add_diagonal_sums(DPOS, ds, i0 - j0, n, BLOCK)
        if TS_GRAD:
            if timed:
                _add_bucket_sums(DTS, ds, bucket, pair, TS_WINDOW)
    _store_rows(DK, dk, start, cols, n, head, stride_dkt, stride_dkh, dqk, D_QK)
    _store_rows(DV, dv_acc * inv_norm, start, cols, n, head, stride_dvt, stride_dvh, dv, D_V)


@_jit
def _hstu_bwd_q(
    Q, K, V, DO, DQ, offsets, timestamps, query_times, has_time, norm, pos_w, ts_w, thresholds,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    H, dqk, dv, num_buckets,
    HAS_POS: tl.constexpr, HAS_TS: tl.constexpr, LOG_BASE: tl.constexpr, PRECISION: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ [T, h, dqk] for one block of query rows."""
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    i0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    start = tl.load(offsets + seq)
    n = (tl.load(offsets + seq + 1) - start).to(tl.int32)
    if i0 >= n:
        return
    rows = i0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, start, rows, n, head, stride_qt, stride_qh, dqk, D_QK)  # [BM, D_QK]
    do = _load_rows(DO, start, rows, n, head, stride_dot, stride_doh, dv, D_V)  # [BM, D_V]
    timed = tl.load(has_time + seq) != 0
    query_time = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_TS:
        query_time = tl.load(query_times + start + rows, mask=rows < n, other=0)
    inv_norm = 1.0 / tl.load(norm + seq)
    dq = tl.zeros([BLOCK_M, D_QK], dtype=tl.float32)
    for j0 in range(0, tl.minimum(i0 + BLOCK_M, n), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K, start, cols, n, head, stride_kt, stride_kh, dqk, D_QK)  # [BN, D_QK]
        v = _load_rows(V, start, cols, n, head, stride_vt, stride_vh, dv, D_V)  # [BN, D_V]
        time = tl.zeros([BLOCK_N], dtype=tl.int64)
        if HAS_TS:
            time = tl.load(timestamps + start + cols, mask=cols < n, other=0)
        s, pair, _ = _scores(q, k, rows, cols, n, timed, query_time, time, pos_w, ts_w, thresholds, num_buckets,
                             HAS_POS, HAS_TS, LOG_BASE, PRECISION)  # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * inv_norm
        ds = tl.where(pair, dp * _silu_grad(s, tl.sigmoid(s)), 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ, dq, start, rows, n, head, stride_dqt, stride_dqh, dqk, D_QK)


# Kernels defined while TRITON_INTERPRET=1 run on CPU tensors, in Python (the mode is fixed at definition).
_INTERPRETED = triton is not None and not isinstance(_hstu_fwd, triton.runtime.JITFunction)


# ------------------------------------------------------------------------------------------------------ host side

_THRESHOLDS: dict[tuple[int, str], torch.Tensor] = {}
_INT64_MAX = torch.iinfo(torch.int64).max


def bucket_thresholds(num_buckets: int, device: torch.device | str) -> torch.Tensor:
    """[num_buckets + 2] int64: entry b (1..num_buckets) is the smallest integer gap g >= 1 with
    ``time_buckets(g) >= b``, entry 0 is 0 and entry num_buckets + 1 is the int64 maximum (no gap reaches it).

    Found by bisection with ``time_buckets`` on ``device`` (its ``torch.log``), so a gap's bucket is the number of
    entries 1..num_buckets at or below it, equal to the reference's; buckets no int64 gap reaches get the maximum.
    Cached per (num_buckets, device)."""
    device = torch.device(device)
    key = (num_buckets, str(device))
    if key not in _THRESHOLDS:
        target = torch.arange(1, num_buckets + 1, device=device)
        zero = torch.zeros(1, 1, dtype=torch.long, device=device)

        def bucket(gap):  # [num_buckets] -> [num_buckets]
            return time_buckets(gap.view(1, -1), zero, num_buckets).view(-1)

        low = torch.ones_like(target)  # bucket(low) = 0 < target
        high = torch.full_like(target, _INT64_MAX)
        reached = bucket(high) >= target
        for _ in range(64):  # invariant: bucket(low) < target <= bucket(high) where reached
            mid = low + (high - low) // 2
            up = bucket(mid) >= target
            high, low = torch.where(up, mid, high), torch.where(up, low, mid)
        inner = torch.where(reached, high, torch.full_like(high, _INT64_MAX))
        edge = torch.tensor([0], dtype=torch.long, device=device)
        _THRESHOLDS[key] = torch.cat([edge, inner, edge.new_full((1,), _INT64_MAX)])
    return _THRESHOLDS[key]


def _head_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rows_last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class _Batch:
    """The jagged batch's non-differentiable inputs, as the kernels read them."""

    offsets: torch.Tensor  # [B + 1] int64
    timestamps: torch.Tensor  # [T] int64 (a stand-in when there is no time term)
    query_times: torch.Tensor  # [T] int64
    has_time: torch.Tensor  # [B] int32
    norm: torch.Tensor  # [B] fp32
    thresholds: torch.Tensor  # [num_buckets + 2] int64
    num_buckets: int
    max_n: int
    timed: bool  # whether the time term is on


def _launch_args(q, v, pos_w, batch: _Batch) -> dict:
    h = q.shape[1]
    return dict(
        H=h, dqk=q.shape[2], dv=v.shape[2], num_buckets=batch.num_buckets,
        HAS_POS=pos_w is not None, HAS_TS=batch.timed, LOG_BASE=LOG_BUCKET_BASE, PRECISION=_precision(q.dtype),
        D_QK=_head_pad(q.shape[2]), D_V=_head_pad(v.shape[2]),
    )  # fmt: skip


def _tables(pos_w, ts_w, batch: _Batch):
    stand_in = batch.norm
    return (pos_w if pos_w is not None else stand_in), (ts_w if batch.timed else stand_in)


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_w, ts_w, batch: _Batch, config: KernelConfig):
        T, h, _ = q.shape
        out = torch.empty(T, h, v.shape[2], dtype=q.dtype, device=q.device)  # [T, h, dv]
        ctx.save_for_backward(q, k, v, pos_w, ts_w)
        ctx.batch, ctx.config = batch, config
        if T == 0 or batch.max_n == 0:
            return out.zero_()
        pos, ts = _tables(pos_w, ts_w, batch)
        B = batch.offsets.shape[0] - 1
        grid = (B * h, triton.cdiv(batch.max_n, config.block_m))
        _hstu_fwd[grid](
            q, k, v, out, batch.offsets, batch.timestamps, batch.query_times, batch.has_time, batch.norm, pos, ts,
            batch.thresholds, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
            **_launch_args(q, v, pos_w, batch), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_w, ts_w = ctx.saved_tensors
        batch, config = ctx.batch, ctx.config
        T, h, _ = q.shape
        d_out = _rows_last_contiguous(d_out.to(q.dtype))
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        pos_grad = pos_w is not None and ctx.needs_input_grad[3]
        ts_grad = ts_w is not None and batch.timed and ctx.needs_input_grad[4]
        dpos = torch.zeros(pos_w.shape[0] if pos_grad else 1, dtype=torch.float32, device=q.device)
        dts = torch.zeros(ts_w.shape[0] if ts_grad else 1, dtype=torch.float32, device=q.device)
        if T > 0 and batch.max_n > 0:
            pos, ts = _tables(pos_w, ts_w, batch)
            B = batch.offsets.shape[0] - 1
            common = (batch.offsets, batch.timestamps, batch.query_times, batch.has_time, batch.norm, pos, ts,
                      batch.thresholds, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *d_out.stride()[:2])
            args = _launch_args(q, v, pos_w, batch)
            launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            _hstu_bwd_kv[(B * h, triton.cdiv(batch.max_n, config.block_kv))](
                q, k, v, d_out, dk, dv, dpos, dts, *common, *dk.stride()[:2], *dv.stride()[:2], **args,
                POS_GRAD=pos_grad, TS_GRAD=ts_grad, BLOCK=config.block_kv, TS_WINDOW=config.ts_window, **launch,
            )  # fmt: skip
            if ctx.needs_input_grad[0]:
                _hstu_bwd_q[(B * h, triton.cdiv(batch.max_n, config.block_m))](
                    q, k, v, d_out, dq, *common, *dq.stride()[:2], **args,
                    BLOCK_M=config.block_m, BLOCK_N=config.block_n, **launch,
                )  # fmt: skip
        d_pos = dpos.to(pos_w.dtype) if pos_grad else None
        d_ts = dts.to(ts_w.dtype) if ts_grad else None  # None (no gradient) when no time term was added
        return dq if ctx.needs_input_grad[0] else None, dk, dv, d_pos, d_ts, None, None


def _check_inputs(q, k, v, offsets, pos_w, ts_w, timestamps, query_times, has_time, num_buckets, norm):
    """Shapes, dtypes and devices -> (offsets int64, max sequence length, norm [B] fp32, whether the time term is
    on). Raises ValueError (or RuntimeError for a device the kernels cannot run on)."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k must be [T, h, dqk] and v [T, h, dv]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype among float32, bfloat16, float16; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")  # fmt: skip
    T = q.shape[0]
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be a 1-d integer tensor [B + 1]; got {offsets.dtype} {tuple(offsets.shape)}")
    bounds = offsets.detach().to("cpu", torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    if int(bounds[0]) != 0 or int(bounds[-1]) != T or bool((lengths < 0).any()):
        raise ValueError(f"offsets must rise from 0 to T = {T} (the number of rows of q); got "
                         f"{bounds[:8].tolist()}{' ...' if len(bounds) > 8 else ''} ending at {int(bounds[-1])}")  # fmt: skip
    B = len(bounds) - 1
    max_n = int(lengths.max()) if B > 0 else 0
    if pos_w is not None and (pos_w.dim() != 1 or pos_w.shape[0] < max_n):
        raise ValueError(f"pos_w must be 1-d with at least the longest sequence's length ({max_n}) entries; got "
                         f"{tuple(pos_w.shape)}")  # fmt: skip
    timed = ts_w is not None and has_time is not None and timestamps is not None
    if ts_w is not None and (ts_w.dim() != 1 or ts_w.shape[0] != num_buckets + 1):
        raise ValueError(f"ts_w must be [num_buckets + 1] = [{num_buckets + 1}]; got {tuple(ts_w.shape)}")
    if timed:
        if query_times is None or timestamps.shape != (T,) or query_times.shape != (T,):
            raise ValueError(f"timestamps and query_times must be [T] = [{T}] with a time term; got "
                             f"{None if timestamps is None else tuple(timestamps.shape)}, "
                             f"{None if query_times is None else tuple(query_times.shape)}")  # fmt: skip
        if has_time.shape != (B,):
            raise ValueError(f"has_time must be [B] = [{B}]; got {tuple(has_time.shape)}")
    norm = torch.as_tensor(norm, dtype=torch.float32, device=q.device).detach().reshape(-1)
    if norm.numel() not in (1, B):
        raise ValueError(f"norm must be a scalar or [B] = [{B}]; got {norm.numel()} values")
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"triton_jagged_hstu_attention needs the triton package, which does not import here "
                           f"({_IMPORT_ERROR}); install genrec[gpu] or use genrec.ops.jagged's engines")  # fmt: skip
    tensors = [t for t in (k, v, offsets, pos_w, ts_w) if t is not None]
    tensors += [t for t in (timestamps, query_times, has_time) if timed]
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"all tensors must be on q's device ({q.device})")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(f"triton_jagged_hstu_attention runs on CUDA tensors, got {q.device}; on CPU it runs only "
                           f"under Triton's interpreter (TRITON_INTERPRET=1 set before importing this module)")  # fmt: skip
    return offsets.to(torch.int64), max_n, norm.expand(B).contiguous(), timed


def triton_jagged_hstu_attention(
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
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Causal HSTU attention per sequence of a jagged batch, on the Triton kernels; the arguments and result of
    ``genrec.ops.jagged.jagged_hstu_attention_reference``.

    q, k [T, h, dqk]; v [T, h, dv] (one dtype: fp32, bf16 or fp16); offsets [B + 1]; pos_w [P >= max n] or None;
    ts_w [num_buckets + 1] or None; timestamps, query_times [T] long; has_time [B] bool (None: no time term);
    norm scalar or [B] -> out [T, h, dv] in q's dtype. Differentiable in q, k, v, pos_w and ts_w. ``config``: tile
    sizes (default ``KernelConfig()``). Reads offsets on the host once (a device sync) to size the grid and check
    them."""
    offsets, max_n, norm, timed = _check_inputs(q, k, v, offsets, pos_w, ts_w, timestamps, query_times, has_time,
                                                num_buckets, norm)  # fmt: skip
    B = offsets.shape[0] - 1
    if timed:
        batch = _Batch(offsets, timestamps.to(torch.int64).contiguous(), query_times.to(torch.int64).contiguous(),
                       has_time.to(torch.int32).contiguous(), norm, bucket_thresholds(num_buckets, q.device),
                       num_buckets, max_n, True)  # fmt: skip
    else:
        stand_in = offsets  # int64, never read without a time term
        batch = _Batch(offsets, stand_in, stand_in, torch.zeros(B, dtype=torch.int32, device=q.device), norm,
                       stand_in, num_buckets, max_n, False)  # fmt: skip
    q, k, v = (_rows_last_contiguous(x) for x in (q, k, v))
    pos_w = pos_w.contiguous() if pos_w is not None else None
    ts_w = ts_w.contiguous() if ts_w is not None else None
    return _HSTUAttention.apply(q, k, v, pos_w, ts_w, batch, config or KernelConfig())

