"""The tiling of the blocked HSTU attention: which (query block, key block) tiles exist, in which order and chunks
they run, their time-bucket ids, and the block size. Pure bookkeeping on index tensors (no autograd, no weights);
the engines that run the tiles are in ``genrec.ops.hstu_attention``.

- Sequences are cut into blocks of ``block`` positions. A (query block, key block) pair of one sequence is a tile.
  Only tiles with key block <= query block exist (the causal upper half is skipped), and only diagonal tiles are
  masked. Tiles run in chunks of about ``tile_elems`` scores (``DEFAULT_TILE_ELEMS``: sized to stay in a core's L2
  cache), so a head's N×N score tensor is never built: at most ``C·h·block²`` scores exist at a time.
- Tiles are grouped by block distance δ = query block - key block. All tiles at one δ share the position offsets
  ``δ·block + (r - c)``, so the position term is one [block, block] tile per δ and its gradient one running sum.
- The time term is evaluated per tile from per-position timestamps. Its bucket ids do not depend on any weight, so
  ``TileBuckets`` computes them once per batch (8 bytes per causal pair up to 8M pairs, then 1 byte; shared by
  heads, layers, forward and backward) instead of once per layer and pass.
- One tile list serves padded batches (tiles past a row's length are skipped) and jagged batches, where the blocks
  of all sequences are packed back to back (``genrec.ops.jagged``).
- ``choose_block`` picks the block size from a rough cost model of the work over all tiles (including the masked
  halves of diagonal tiles and the padding of each sequence's last block), the per-tile calls and copies, and the
  per-chunk overhead; ``loop_panel`` is the row panel of a diagonal tile in the C loop.

Public: ``choose_block``, ``loop_panel``, ``TileChunk``, ``BlockLayout`` / ``block_layout``, ``TileBuckets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from genrec.ops import native as native_mod

# Scores (C·h·block²) per chunk of tiles: 256K fp32 = 1 MiB, so that a chunk's scores stay in a core's L2 cache (1-2 MiB
# on current x86 server cores) between the products that write and read them.
DEFAULT_TILE_ELEMS = 1 << 18
LONG_BUCKET_PAIRS = 1 << 23


# A rough cost model, used only to rank block sizes (so only the ratios of these constants matter), with the magnitudes
# of one x86 core at one thread in fp32. Per chunk: Python and launch overhead of ~30 ops (forward + backward). Per
# tile: 7 small GEMM calls per head, and gathering / scattering ~8 [block, h·dim] row blocks. Per (query, key) pair
# and head: 7 matmul passes of 2·dim FLOPs, plus the elementwise passes.
CHUNK_COST_S = 0.4e-3
GEMM_CALL_S = 1e-6
COPY_S = 0.5e-9
PAIR_COST_S = 6e-9
FLOP_COST_S = 1 / 60e9
BLOCK_SIZES = (16, 32, 64, 128, 256)


def loop_panel(block: int) -> int:
    """Rows per panel of a diagonal tile in the C loop (each panel computes key columns up to its last row)."""
    return block // 4 if block >= 128 else block


def choose_block(lengths, heads: int, head_dim: int, tile_elems: int = DEFAULT_TILE_ELEMS) -> int:
    """The block size (of ``BLOCK_SIZES``) with the lowest estimated forward+backward cost for sequences of
    ``lengths``, from the constants above: work over all tiles (including the masked halves of diagonal tiles and
    the padding of each sequence's last block), per-tile GEMM calls and row copies, and per-chunk overhead. Small
    blocks waste little on short rows; large ones cut per-tile costs on long rows (it picks 32 for ML-1M batches with
    2 heads x 25, and 128-256 for one row of 256-4096 with 4 heads x 64)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1).numpy()
    best, best_cost = BLOCK_SIZES[0], float("inf")
    for block in BLOCK_SIZES:
        m = (lengths + block - 1) // block  # blocks per sequence
        tiles = int((m * (m + 1) // 2).sum())
        per_chunk = max(1, tile_elems // (heads * block * block))
        # tiles at each distance d (Σ over sequences of max(m - d, 0)), run in chunks of per_chunk
        at_d = np.maximum(m[None, :] - np.arange(int(m.max()) if len(m) else 0)[:, None], 0).sum(axis=1)
        chunks = int((-(-at_d // per_chunk)).sum())
        per_tile = heads * (7 * GEMM_CALL_S + 8 * block * head_dim * COPY_S
                            + block * block * (PAIR_COST_S + 14 * head_dim * FLOP_COST_S))
        cost = tiles * per_tile + chunks * CHUNK_COST_S
        if cost < best_cost:
            best, best_cost = block, cost
    return best


@dataclass(frozen=True)
class TileChunk:
    """Tiles at block distance ``delta``: query blocks ``qi`` [C], key blocks ``ki = qi - delta`` [C].
    ``q_span`` / ``k_span`` = (start, stop) when the ids are one contiguous range (then rows are sliced, not
    gathered)."""

    delta: int
    qi: torch.Tensor
    ki: torch.Tensor
    q_span: tuple[int, int] | None
    k_span: tuple[int, int] | None


@dataclass(frozen=True)
class BlockLayout:
    """Which tiles exist. Sequence s occupies blocks ``block_start[s] .. block_start[s] + ceil(n_s / block) - 1``;
    slot r of block b holds position ``block_pos[b] · block + r`` of sequence ``block_seq[b]``."""

    block: int
    num_blocks: int  # blocks in the tensors, including blocks no tile touches (the padding of a padded batch)
    num_deltas: int  # largest number of blocks of one sequence
    block_pos: torch.Tensor  # [num_blocks] long (0 for untouched blocks)
    block_seq: torch.Tensor  # [num_blocks] long (0 for untouched blocks)
    chunks: tuple[TileChunk, ...]  # ordered by first key block, then first query block

    @property
    def num_tiles(self) -> int:
        return sum(len(c.qi) for c in self.chunks)

    @cached_property
    def tiles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qi, ki, delta) [num_tiles] long: every tile's query block, key block and distance, in chunk order (the
        order of ``TileBuckets``' ids). Built once per layout, which every layer of a batch shares."""
        if not self.chunks:
            return (torch.zeros(0, dtype=torch.long),) * 3
        qi = torch.cat([c.qi for c in self.chunks])
        ki = torch.cat([c.ki for c in self.chunks])
        delta = torch.cat([torch.full((len(c.qi),), c.delta, dtype=torch.long) for c in self.chunks])
        return qi, ki, delta

    @cached_property
    def key_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The C loop's tile list: (qi, ki, delta, order, gstart) with the tiles sorted by key block, then query
        block (``order``: their indices in chunk order), and key block g's tiles at gstart[g] .. gstart[g+1]-1."""
        qi, ki, delta = self.tiles
        order = torch.argsort(ki * self.num_blocks + qi)
        ki_sorted = ki[order].contiguous()
        counts = torch.unique_consecutive(ki_sorted, return_counts=True)[1]
        gstart = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        return qi[order].contiguous(), ki_sorted, delta[order].contiguous(), order, gstart


def block_layout(
    lengths: torch.Tensor,
    block: int,
    heads: int,
    block_start: torch.Tensor | None = None,
    num_blocks: int | None = None,
    tile_elems: int = DEFAULT_TILE_ELEMS,
) -> BlockLayout:
    """Tile list for sequences of ``lengths`` [B] (>= 0), ``heads`` heads.

    ``block_start`` [B]: first block of each sequence; the default packs sequences back to back (jagged). A padded
    batch of width N (a multiple of ``block``) passes ``arange(B) · N / block`` and ``num_blocks = B · N / block``.
    """
    lengths = lengths.to(torch.long).cpu()
    nblk = (lengths + block - 1) // block  # [B] blocks used by each sequence
    first = torch.cumsum(nblk, 0) - nblk
    block_start = first if block_start is None else block_start.to(torch.long).cpu()
    total = int(nblk.sum()) if num_blocks is None else num_blocks
    seq = torch.repeat_interleave(torch.arange(len(lengths)), nblk)  # [M] sequence of every used block
    pos = torch.arange(len(seq)) - first[seq]  # [M] block index within its sequence
    ids = block_start[seq] + pos  # [M] block id in the tensors
    block_pos = torch.zeros(total, dtype=torch.long)
    block_seq = torch.zeros(total, dtype=torch.long)
    block_pos[ids], block_seq[ids] = pos, seq
    per_chunk = max(1, tile_elems // (heads * block * block))
    num_deltas = int(nblk.max()) if len(nblk) else 0
    ids_np, pos_np = ids.numpy(), pos.numpy()
    chunks, keys = [], []
    for delta in range(num_deltas):
        qi_all = ids_np[pos_np >= delta]  # query blocks of every tile at this distance, in block order
        # breaks[i]: how many of the first i neighbouring pairs are not consecutive ids; a chunk's ids form one
        # range (rows are then sliced, not gathered) when no pair inside it breaks. ki = qi - delta breaks alike.
        breaks = np.concatenate(([0], np.cumsum(np.diff(qi_all) != 1)))
        for c in range(0, len(qi_all), per_chunk):
            e = min(c + per_chunk, len(qi_all))
            qi = torch.from_numpy(qi_all[c:e])
            ki = qi - delta
            if breaks[e - 1] == breaks[c]:
                a = int(qi_all[c])
                q_span, k_span = (a, a + e - c), (a - delta, a - delta + e - c)
            else:
                q_span = k_span = None
            chunks.append(TileChunk(delta, qi, ki, q_span, k_span))
            keys.append((int(qi_all[c]) - delta, int(qi_all[c])))
    # Run the chunks key block by key block (then by query block): a key block's K and V rows, and in backward its
    # dK / dV accumulators, stay in cache across its query blocks (bench/attention_blocks.py compares the orders).
    chunks = [chunks[i] for i in sorted(range(len(chunks)), key=keys.__getitem__)]
    return BlockLayout(block, total, num_deltas, block_pos, block_seq, tuple(chunks))


class TileBuckets:
    """Time-bucket id of every causal pair, tile by tile: one [C, block, block] tensor per chunk of ``layout``
    (uint8 on the native path; otherwise int64 up to ``LONG_BUCKET_PAIRS`` pairs in the batch, else uint8).

    slot_t, slot_qt [num_blocks, block] long: key timestamp / query time of every slot; block_time [num_blocks]
    bool: whether the block's row has timestamps (rows without get id ``num_buckets + 1``, which carries no weight).
    The ids equal ``genrec.ops.hstu_math.time_buckets`` (same fp32 operations in the same order).

    lib: the native kernel (``genrec.ops.native.load()``) computes the ids of all tiles in one call instead of
    eight PyTorch passes per chunk (same fp32 formula with its own log polynomial: on 1.8 M gaps sampled around
    every bucket boundary, 5 ids differ from torch's, each a gap whose log / 0.301 is within fp32 rounding of an
    integer; none in 25 M random pairs), and stores them as uint8 whenever the ids fit (the kernel reads either).
    """

    def __init__(self, layout: BlockLayout, slot_t, slot_qt, block_time, num_buckets: int, lib=None) -> None:
        self.num_buckets = num_buckets
        self.layout = layout
        pairs = layout.num_tiles * layout.block**2
        # int64 ids are gathered directly; past 8M pairs (64 MB) keep 1 byte per pair and widen per chunk instead
        small = num_buckets + 1 <= 255
        dtype = torch.uint8 if small and (lib is not None or pairs > LONG_BUCKET_PAIRS) else torch.long
        self.chunks = []
        if lib is not None:  # every tile in one call, in chunk order; chunk n is a view of its tiles
            qi, ki, _ = layout.tiles
            out = torch.empty(len(qi), layout.block, layout.block, dtype=dtype)
            slot_qt, slot_t = slot_qt.to(torch.long).contiguous(), slot_t.to(torch.long).contiguous()
            timed = block_time.to(torch.uint8).contiguous()
            lib.time_buckets(native_mod.BucketArgs(
                slot_qt=slot_qt.data_ptr(), slot_t=slot_t.data_ptr(), timed=timed.data_ptr(), qi=qi.data_ptr(),
                ki=ki.data_ptr(), out=out.data_ptr(), n=len(qi), B=layout.block, nb=num_buckets,
                out_dtype=0 if dtype == torch.long else 1))
            self.chunks = list(torch.split(out, [len(c.qi) for c in layout.chunks]))
            return
        for c in layout.chunks:
            qt = slot_qt.index_select(0, c.qi).unsqueeze(2)  # [C, Bs, 1]
            t = slot_t.index_select(0, c.ki).unsqueeze(1)  # [C, 1, Bs]
            gap = (qt - t).abs_().clamp_(min=1).to(torch.float32)  # [C, Bs, Bs]
            b = gap.log_().div_(0.301).floor_().clamp_(0, num_buckets).to(dtype)
            no_time = ~block_time.index_select(0, c.qi)  # [C]
            if bool(no_time.any()):
                b.masked_fill_(no_time.view(-1, 1, 1), num_buckets + 1)
            self.chunks.append(b)

    @cached_property
    def loop_addresses(self) -> torch.Tensor:
        """[num_tiles] int64: the address of each tile's ids, in the C loop's tile order (``key_groups``); built
        once, for every layer that shares these ids."""
        tile_bytes = self.layout.block**2 * self.chunks[0].element_size()
        ptr = torch.cat([b.data_ptr() + torch.arange(len(b)) * tile_bytes for b in self.chunks])
        return ptr[self.layout.key_groups[3]].contiguous()

    @staticmethod
    def build(layout, slot_t, slot_qt, block_time, num_buckets, lib=None) -> TileBuckets | None:
        """None when no row has timestamps (then the time term is 0 everywhere)."""
        if block_time is None or not bool(block_time.any()):
            return None
        return TileBuckets(layout, slot_t, slot_qt, block_time, num_buckets, lib)
