"""HSTU speed, side by side (not a test): fast paths of genrec.ops against the plain path and against PyTorch's fused
SDPA Transformer pieces. Paper §5 claims (HSTU faster than FlashAttention-2 Transformers; ragged attention 2-5x;
M-FALCON) measured on the CPU this runs on; every row records torch's version, the thread count and the CPU model.

Every ratio row is measured in one run, the two sides interleaved round by round (so load drifts hit both), and
each time is the median of ``--reps`` rounds after one warm-up. Ratios are "x" = time(baseline) / time(fast): > 1
means the fast side is faster. Forward+backward means one forward and one ``backward()`` of a sum.

    python bench/speed.py                       # full run, writes results/speed.json (minutes)
    python bench/speed.py --quick --out /tmp/speed.json   # seconds-long smoke run with small shapes
    python bench/speed.py --sections loss training   # some sections only: their rows replace those of the same name
    python bench/speed.py --table                    # rewrite the table in docs/performance.md from results/speed.json
    python bench/speed.py --device cuda --out results/speed_cuda.json   # the GPU section (a CUDA device + Triton)

Rows (``name``, ``value``, ``unit``, ``detail``):
- ``attention/...``: HSTU attention (4 heads × 64, relative bias with position and time terms) plain and blocked vs
  ``scaled_dot_product_attention(is_causal=True)``, fp32 and bf16, lengths 256 / 1024 / 4096, one sequence.
- ``layer/...``: one HSTU layer (d = 256, 4 × 64) plain and blocked vs a pre-norm Transformer layer of the same
  width (LayerNorm, QKV, causal SDPA, output projection, LayerNorm, FFN 4d with GELU), same lengths.
- ``jagged/...``: whole-encoder forward+backward, jagged vs padded plain, on ML-1M training lengths (cap 200,
  128 random rows, HSTU-large ML-1M config) and on a synthetic long tail (cap 4096, 8 rows of which one at the
  cap, see ``long_tail_lengths``). Full mode: the padded side of this row needs ~5 GB (B·N² int64 buckets/index).
  ML-1M lengths come from the ML-1M files found through ``--data-dir`` / ``$GENREC_DATA_DIR`` / the cache
  (``genrec data fetch ml-1m``); without them a synthetic ML-1M-like stand-in is used and the rows say so.
- ``mfalcon/...``: rank 1024 candidates for a 512-item history (d = 256, 4 layers, 4 × 64, max_len 1024): M-FALCON
  (cache build + cached microbatches of 64) vs per-candidate ``HSTU.encode`` vs one pass per microbatch without
  cache. Per-candidate time is measured on ``--per-candidate`` candidates and scaled linearly to 1024 (its cost
  is exactly linear: independent batches of 32 rows); the detail says so.
- ``ranking/ml-1m/hstu-ranker/...``: the HSTU ranker (configs/ml-1m/ranking-hstu.yaml sizes, freshly initialised,
  ML-1M schema sizes, history window widened to the history) ranking 200 candidates after one 200-event history:
  M-FALCON (``HSTURanker.rank_cached``, the ranking API's path) vs the one-pass masked forward vs one forward of
  history + 1 candidate per candidate; medians in ms and the ratios per_candidate / mfalcon, one_pass / mfalcon.
- ``train/...``: one training step (encode + per-sequence sampled softmax with 128 negatives + backward + AdamW) on
  ML-1M lengths, HSTU-large ML-1M config, padded plain vs jagged, fp32 and bf16 autocast: tokens/s, achieved
  GFLOP/s (model FLOPs: real tokens and causal pairs only, backward counted as 2x forward) and its fraction of this
  machine's measured matmul peak (square ``torch.mm``, same dtype and threads).
- ``loss/...``: one ML-1M HSTU training step with per-position negatives, the logits from sparse products
  (``genrec.train.loss.sampled_logits``) vs a full-catalogue product and a gather.
- ``stochastic_length/...``: expected sparsity (fraction of tokens dropped) for α ∈ {1.6, 1.8, 2.0}.
- ``gpu/...`` (``--device cuda``, needs a CUDA device and Triton): HSTU attention through the Triton kernel
  (``genrec.ops.triton_hstu``) vs causal SDPA (FlashAttention), fwd+bwd, bf16, lengths 1k-8k; one HSTU-large ML-1M
  training step in bf16, the Triton jagged path vs the padded PyTorch path. CUDA times synchronise the device.

- ``epoch/...``: one ML-1M training epoch (no evaluation) of the SASRec, HSTU and HSTU-large configs, and HSTU-large
  without the native kernel, with bf16 autocast and with shared negatives, one after the other; HSTU vs SASRec, and
  HSTU-large against a fixed 50 s reference: one epoch of a plain-PyTorch HSTU-large (padded attention, no native
  kernels) trained with per-batch shared negatives.

Not here: quality (NDCG) of bf16 and Stochastic Length needs whole trainings (``bench/efficiency_quality.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import ISA_CHOICES, ISA_HELP, isa_env_missing, reexec_for_isa  # noqa: E402

if __name__ == "__main__":
    reexec_for_isa(sys.argv[1:])  # --isa avx2: start again with the settings in the environment, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.data.batches import Batch  # noqa: E402
from genrec.data.stochastic_length import expected_sparsity  # noqa: E402
from genrec.models.hstu import HSTU, HSTUConfig, HSTULayer, hstu_attention, rab_index, time_buckets  # noqa: E402
from genrec.ops.hstu_attention import blocked_hstu_attention  # noqa: E402
from genrec.runtime import machine_info, machine_summary, native_bf16  # noqa: E402
from genrec.models.fuxi_alpha import FuXiAlpha, FuXiAlphaConfig  # noqa: E402
from genrec.ops.jagged import (  # noqa: E402
    jagged_context,
    jagged_encode_batch,
    jagged_fuxi_encode_batch,
    jagged_hstu_layer,
    lengths_to_offsets,
)
from genrec.ops.mfalcon import (  # noqa: E402
    build_history_cache,
    score_candidates,
    score_candidates_one_by_one,
    score_candidates_uncached,
)
from genrec.train.loss import sampled_softmax_loss  # noqa: E402

DATA_DIR: str | None = None  # --data-dir; None: $GENREC_DATA_DIR, then the cache directory
ROWS: list[dict] = []
PLAIN_BASELINE_SECONDS = 50.0
PLAIN_BASELINE = (f"{PLAIN_BASELINE_SECONDS:.0f} s (one epoch of a plain-PyTorch HSTU-large with shared negatives, "
                  "a fixed reference figure)")
SECTIONS = ("attention", "layer", "jagged", "mfalcon", "ranking", "training", "loss", "epochs", "stochastic_length")
GPU_SECTIONS = ("gpu",)  # --device cuda: the Triton kernel against FlashAttention (SDPA), a bf16 training step


# ------------------------------------------------------------------------------------------------------- helpers


def timed(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable; one warm-up each, then ``reps`` rounds running them side by side. Round i
    starts at callable i (mod their number), so that no callable always runs right after the same one: what one
    leaves behind (freed memory that glibc gave back and the next one faults in again, a cold cache) does not land
    on the same neighbour every round."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    items = list(fns.items())
    for i in range(reps):
        for name, f in items[i % len(items):] + items[: i % len(items)]:
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(name: str, value: float, unit: str, detail: str) -> None:
    ROWS.append({"name": name, "value": round(float(value), 4), "unit": unit, "detail": detail})
    print(f"{name:58s} {value:10.3f} {unit:8s} {detail}", flush=True)


def native_note() -> str:
    from genrec.ops import native

    lib = native.load()
    if lib is None:
        return "native kernel NOT available: blocked = torch passes"
    loop = ("fp32 = the C tile loop over PyTorch's BLAS sgemm, bf16 = " if lib.has_sgemm
            else "no BLAS sgemm exported here, so fp32 and bf16 = ")
    return (f"blocked: {loop}engine + native C kernel between ATen matmuls (genrec/ops/hstu_tiles.c); torch_passes = "
            "engine with PyTorch elementwise passes")


def ratio_rows(prefix: str, t: dict[str, float], pairs: list[tuple[str, str, str]], context: str) -> None:
    """pairs: (row suffix, fast name, baseline name) -> value = t[baseline] / t[fast]."""
    for suffix, fast, base in pairs:
        times = f"{fast} {t[fast] * 1e3:.1f} ms vs {base} {t[base] * 1e3:.1f} ms"
        row(f"{prefix}/{suffix}", t[base] / t[fast], "x", f"{times}; {context}")


def fwd_bwd(fn, *inputs):
    """A callable running fn(*inputs).sum().backward() (gradients are reset so that they do not accumulate)."""

    def run():
        for x in inputs:
            x.grad = None
        fn().float().sum().backward()

    return run


def ml1m_training_lengths(cap: int = 200) -> tuple[np.ndarray, str]:
    """Input length of every ML-1M user's training row: min(n - 3, cap) (leave-one-out: valid and test items are
    held out, and the last training item is only a target). Synthetic stand-in if ML-1M is not found."""
    from genrec.config import DataConfig
    from genrec.data.dataset import prepare_data

    try:
        n = prepare_data(DataConfig(dataset="ml-1m", data_dir=DATA_DIR, max_len=cap)).sequences.lengths
        return np.minimum(n - 3, cap), f"ML-1M real lengths ({len(n)} users)"
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"ML-1M not found ({str(exc).splitlines()[0]}): synthetic ML-1M-like lengths", file=sys.stderr)
    rng = np.random.default_rng(0)  # ML-1M-like: >= 20 ratings, long tail (median ~96, ~37% of users over cap)
    n = np.minimum(20 + np.ceil(rng.lognormal(4.3, 1.1, size=6040)), 2314).astype(int)
    return np.minimum(n - 3, cap), "synthetic ML-1M-like lengths (ML-1M not found): 20 + lognormal(4.3, 1.1)"


def long_tail_lengths(count: int, cap: int, seed: int = 0, with_cap_row: bool = True) -> np.ndarray:
    """Synthetic long tail: ceil(lognormal(mean 5, sigma 1.5)) clipped to [1, cap] (median ~150, ~1.4% of rows at
    cap 4096). For a batch (``with_cap_row``), the last of ``count`` rows is set to the cap: a batch that holds one
    capped row, which is what sets a padded batch's width."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.ceil(rng.lognormal(5.0, 1.5, size=count)), 1, cap).astype(int)
    if with_cap_row:
        lengths[-1] = cap
    return lengths


def make_batch(lengths, num_items: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
    B, N = len(lengths), int(lengths.max())
    valid = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    ids = torch.randint(1, num_items + 1, (B, N), generator=g) * valid
    ts = torch.cumsum(torch.randint(0, 100_000, (B, N + 1), generator=g), 1)
    targets = torch.randint(1, num_items + 1, (B, N), generator=g) * valid
    return Batch(ids, ts[:, :-1] * valid, ts[:, 1:] * valid, lengths, torch.ones(B, dtype=torch.bool), targets)


def hstu(num_items: int, max_len: int, d: int, blocks: int, heads: int, dim: int) -> HSTU:
    torch.manual_seed(0)
    cfg = HSTUConfig(num_items=num_items, max_len=max_len, embedding_dim=d, num_blocks=blocks, num_heads=heads,
                     attention_dim=dim, linear_dim=dim, dropout=0.0, linear_dropout=0.0)
    return HSTU(cfg)


def encoder_flops(cfg: HSTUConfig, lengths) -> float:
    """Forward model FLOPs of the encoder: per layer 2·d·2h(dv+dqk) + 2·h·dv·d per token, 2·h·(dqk+dv) per causal
    pair (QKᵀ and AV)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    h, dqk, dv, d = cfg.num_heads, cfg.attention_dim, cfg.linear_dim, cfg.embedding_dim
    per_token = 2 * d * 2 * h * (dv + dqk) + 2 * h * dv * d
    pairs = float((lengths * (lengths + 1) / 2).sum())
    return cfg.num_blocks * (per_token * lengths.sum() + pairs * 2 * h * (dqk + dv))


# ------------------------------------------------------------------------------------------------------ sections


def bench_attention(lengths: list[int], reps: int, dtypes: list[torch.dtype], plain_max: int) -> None:
    h, dim = 4, 64
    for dtype in dtypes:
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for N in lengths:
            g = torch.Generator().manual_seed(N)
            q, k, v = ((torch.randn(1, h, N, dim, generator=g) * 0.3).to(dtype).requires_grad_() for _ in range(3))
            ts = torch.cumsum(torch.randint(0, 100_000, (1, N + 1), generator=g), 1)
            t, qt = ts[:, :-1], ts[:, 1:]
            has_time = torch.ones(1, dtype=torch.bool)
            layer = HSTULayer(HSTUConfig(num_items=1, max_len=N, num_heads=h, attention_dim=dim, linear_dim=dim))
            pos_w, ts_w = layer.rab.pos_w, layer.rab.ts_w
            norm = torch.tensor([float(N)])
            pos = torch.arange(N)
            offsets = (pos.view(N, 1) - pos.view(1, N)).clamp(min=0)
            causal = torch.ones(N, N, dtype=dtype).tril()

            def plain():
                rab = layer.rab(offsets, rab_index(offsets, time_buckets(qt, t, 128), has_time, 128)).to(dtype)
                return hstu_attention(q, k, v, rab, causal, norm)

            fns = {
                "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v),
                "blocked": fwd_bwd(lambda: blocked_hstu_attention(q, k, v, pos_w, ts_w, t, qt, has_time, 128, norm),
                                   q, k, v, pos_w, ts_w),
                "blocked_torch_passes": fwd_bwd(
                    lambda: blocked_hstu_attention(q, k, v, pos_w, ts_w, t, qt, has_time, 128, norm, native=False),
                    q, k, v, pos_w, ts_w),
                "blocked_pos_only": fwd_bwd(
                    lambda: blocked_hstu_attention(q, k, v, pos_w, None, t, qt, has_time, 128, norm), q, k, v, pos_w),
            }
            pairs = [("blocked_vs_sdpa", "blocked", "sdpa"), ("blocked_pos_only_vs_sdpa", "blocked_pos_only", "sdpa"),
                     ("blocked_torch_passes_vs_sdpa", "blocked_torch_passes", "sdpa"),
                     ("blocked_vs_torch_passes", "blocked", "blocked_torch_passes")]
            if N <= plain_max:
                fns["plain"] = fwd_bwd(plain, q, k, v, pos_w, ts_w)
                pairs += [("plain_vs_sdpa", "plain", "sdpa"), ("blocked_vs_plain", "blocked", "plain")]
            t_ = timed(fns, reps)
            ratio_rows(f"attention/{tag}/N={N}", t_, pairs,
                       f"fwd+bwd, 1 sequence, 4 heads x 64, {tag}, rab = position + time (pos_only: position); "
                       f"{native_note()}")


class PreNormTransformerLayer(nn.Module):
    """The baseline: x + Wo·SDPA_causal(LN(x)); then + FFN(LN(·)) with FFN = Linear(d, 4d), GELU, Linear(4d, d)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, d)
        x = x + self.proj(a)
        return x + self.ffn(self.ln2(x))


def bench_layer(lengths: list[int], reps: int, plain_max: int) -> None:
    d, h = 256, 4
    for N in lengths:
        torch.manual_seed(0)
        model = hstu(10, N, d, 1, h, d // h)
        layer = model.layers[0]
        tfm = PreNormTransformerLayer(d, h)
        x = torch.randn(1, N, d, requires_grad=True)
        g = torch.Generator().manual_seed(1)
        ts = torch.cumsum(torch.randint(0, 100_000, (1, N + 1), generator=g), 1)
        lengths_t = torch.tensor([N])
        ctx = jagged_context(model, lengths_to_offsets(lengths_t), ts[0, :-1], ts[0, 1:], torch.tensor([True]))
        ctx_torch = jagged_context(model, lengths_to_offsets(lengths_t), ts[0, :-1], ts[0, 1:], torch.tensor([True]),
                                   native=False)
        pos = torch.arange(N)
        offsets = (pos.view(N, 1) - pos.view(1, N)).clamp(min=0)
        causal = torch.ones(N, N).tril()
        norm = torch.tensor([float(N)])

        def plain():
            index = rab_index(offsets, time_buckets(ts[:, 1:], ts[:, :-1], 128), torch.tensor([True]), 128)
            return layer(x, offsets, index, causal, norm)

        fns = {
            "transformer": fwd_bwd(lambda: tfm(x), x),
            "hstu_blocked": fwd_bwd(lambda: jagged_hstu_layer(layer, x[0], ctx), x),
            "hstu_blocked_torch_passes": fwd_bwd(lambda: jagged_hstu_layer(layer, x[0], ctx_torch), x),
        }
        pairs = [("hstu_blocked_vs_transformer", "hstu_blocked", "transformer"),
                 ("hstu_blocked_torch_passes_vs_transformer", "hstu_blocked_torch_passes", "transformer")]
        if N <= plain_max:
            fns["hstu_plain"] = fwd_bwd(plain, x)
            pairs.append(("hstu_plain_vs_transformer", "hstu_plain", "transformer"))
        t_ = timed(fns, reps)
        ratio_rows(f"layer/N={N}", t_, pairs,
                   f"fwd+bwd, d=256, 4 heads x 64, fp32; HSTU with position+time rab; {native_note()}")


def bench_jagged(ml_rows: int, tail_rows: int, tail_cap: int, reps: int) -> None:
    lengths, source = ml1m_training_lengths()
    rng = np.random.default_rng(0)
    cases = [
        ("ml-1m", lengths[rng.choice(len(lengths), ml_rows, replace=False)], 200, (50, 8, 2, 25), source),
        ("long-tail", long_tail_lengths(tail_rows, tail_cap), tail_cap, (64, 2, 1, 64),
         f"synthetic lognormal(5, 1.5) lengths, cap {tail_cap}, one row at the cap"),
    ]
    for name, lens, cap, (d, blocks, heads, dim), what in cases:
        model = hstu(1000, cap, d, blocks, heads, dim)
        batch = make_batch(lens, 1000)
        t_ = timed({
            "padded_plain": fwd_bwd(lambda: model.encode(batch)),
            "jagged": fwd_bwd(lambda: jagged_encode_batch(model, batch)),
        }, reps)
        waste = len(lens) * int(lens.max()) ** 2 / float((lens.astype(float) ** 2).sum())
        ratio_rows(f"jagged/{name}", t_, [("jagged_vs_padded", "jagged", "padded_plain")],
                   f"encoder fwd+bwd, {len(lens)} rows (mean {lens.mean():.0f}, max {lens.max()}), {what}; "
                   f"d={d}, {blocks} layers, {heads}x{dim}; B·max²/Σn² = {waste:.1f}")
    # FuXi-α at HSTU-large's size (the FuXi-α paper's ML-1M large model) on the same ML-1M rows
    lens = cases[0][1]
    torch.manual_seed(0)
    fuxi = FuXiAlpha(FuXiAlphaConfig(num_items=1000, max_len=200, embedding_dim=50, num_blocks=8, num_heads=2,
                                     attention_dim=25, linear_dim=25, ffn_dim=50))  # fmt: skip
    batch = make_batch(lens, 1000)
    t_ = timed({
        "padded_plain": fwd_bwd(lambda: fuxi.encode(batch)),
        "jagged": fwd_bwd(lambda: jagged_fuxi_encode_batch(fuxi, batch)),
    }, reps)
    ratio_rows("jagged/ml-1m-fuxi-alpha", t_, [("jagged_vs_padded", "jagged", "padded_plain")],
               f"FuXi-α encoder fwd+bwd, the same {len(lens)} ML-1M rows; d=50, 8 blocks, 2x25, SwiGLU 50")


def bench_mfalcon(history: int, candidates: int, per_candidate: int, reps: int, microbatch: int = 64) -> None:
    model = hstu(5000, max(1024, history + 1), 256, 4, 4, 64).eval()
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, 5001, (history,), generator=g)
    times = torch.cumsum(torch.randint(0, 100_000, (history,), generator=g), 0)
    req = int(times[-1]) + 1000
    cands = torch.randint(1, 5001, (candidates,), generator=g)
    sub = cands[:per_candidate]
    cache = build_history_cache(model, hist, times, req)
    with torch.no_grad():
        t_ = timed({
            "mfalcon": lambda: score_candidates(model, build_history_cache(model, hist, times, req), cands, microbatch),
            "mfalcon_cache_reused": lambda: score_candidates(model, cache, cands, microbatch),
            "uncached": lambda: score_candidates_uncached(model, hist, times, req, cands, microbatch),
            "per_candidate_subset": lambda: score_candidates_one_by_one(model, hist, times, req, sub, batch_size=32),
        }, reps)
    t_["per_candidate"] = t_["per_candidate_subset"] * candidates / len(sub)
    ctx = (f"history {history}, {candidates} candidates, b_m={microbatch}, d=256, 4 layers, 4x64, inference fp32; "
           f"per-candidate measured on {len(sub)} candidates and scaled x{candidates / len(sub):.0f}")
    ratio_rows("mfalcon", t_, [
        ("mfalcon_vs_per_candidate", "mfalcon", "per_candidate"),
        ("mfalcon_vs_uncached", "mfalcon", "uncached"),
        ("mfalcon_cache_reused_vs_per_candidate", "mfalcon_cache_reused", "per_candidate"),
    ], ctx)


def bench_ranking(history: int, candidates: int, reps: int) -> None:
    """The HSTU ranker ranking ``candidates`` items for one ``history``-event history: M-FALCON (``rank_cached``,
    the path of ``genrec.ranking_api.Ranker``) vs the one-pass masked forward vs one ranker pass per candidate
    (history + 1 candidate, ``candidates`` forwards). Sizes from configs/ml-1m/ranking-hstu.yaml; a freshly
    initialised model (speed does not depend on the weights) with ML-1M's schema sizes."""
    from genrec.config import load_ranking_config
    from genrec.data.ranking_batch import RankingBatch, RankingSchema
    from genrec.ranking_api import CANDIDATE_MICROBATCH
    from genrec.train.ranking import build_ranker

    config = load_ranking_config(ROOT / "configs" / "ml-1m" / "ranking-hstu.yaml")
    schema = RankingSchema(num_items=3706, num_users=6040, tasks=("like", "love"),
                           actions=("r1", "r2", "r3", "r4", "r5"), user_features=("gender", "age", "occupation"),
                           user_feature_sizes=(2, 7, 21))  # ML-1M's sizes; no dense features (HSTU reads none)
    torch.manual_seed(0)
    # the config's model sizes; the history window widened to the benchmarked history so every event is read
    model = build_ranker(config.model, schema, max_history=max(history, config.data.max_history)).eval()
    g = torch.Generator().manual_seed(0)
    times = 1_000_000_000 + torch.cumsum(torch.randint(1, 100_000, (1, history), generator=g), 1)  # [1, L]
    now = int(times[0, -1]) + 600

    def batch_of(cands: torch.Tensor) -> RankingBatch:
        C = cands.shape[1]
        return RankingBatch(
            user_ids=torch.zeros(1, dtype=torch.long), hist_items=hist_items, hist_actions=hist_actions,
            hist_times=times, hist_lengths=torch.tensor([history]), cand_items=cands,
            cand_times=torch.full((1, C), now), cand_mask=torch.ones(1, C, dtype=torch.bool),
            user_features=torch.tensor([[1, 3, 5]]), dense_features=torch.zeros(1, C, 0),
        )  # fmt: skip

    hist_items = torch.randint(1, schema.num_items + 1, (1, history), generator=g)
    hist_actions = 1 << torch.randint(0, 5, (1, history), generator=g)  # one rating bit per event
    cands = torch.randint(1, schema.num_items + 1, (1, candidates), generator=g)
    full = batch_of(cands)
    singles = [batch_of(cands[:, i : i + 1]) for i in range(candidates)]
    with torch.inference_mode():
        diff = float((model.rank_cached(full, CANDIDATE_MICROBATCH) - model(full)).abs().max())
        t_ = timed({
            "mfalcon": lambda: model.rank_cached(full, CANDIDATE_MICROBATCH),
            "one_pass": lambda: model(full),
            "per_candidate": lambda: [model(b) for b in singles],
        }, reps)
    p = config.model.params
    ctx = (f"HSTU ranker, configs/ml-1m/ranking-hstu.yaml sizes ({p.get('variant', 'summed')}, d={model.config.embedding_dim}, "
           f"{model.config.num_blocks} layers, {model.config.num_heads}x{model.config.attention_dim}, "
           f"3 user-feature prefix tokens; max_history widened to {model.config.max_history}), freshly initialised, "
           f"inference fp32, one history of {history} events, {candidates} candidates; mfalcon = rank_cached with "
           f"micro-batches of {CANDIDATE_MICROBATCH} (the Ranker's path), one_pass = forward over history + all "
           f"candidates with the target-aware mask, per_candidate = {candidates} forwards of history + 1 candidate; "
           f"max |mfalcon - one_pass| logit {diff:.1e}")
    for name in ("mfalcon", "one_pass", "per_candidate"):
        row(f"ranking/ml-1m/hstu-ranker/{name}", t_[name] * 1e3, "ms", ctx)
    ratio_rows("ranking/ml-1m/hstu-ranker", t_, [
        ("mfalcon_vs_per_candidate", "mfalcon", "per_candidate"),
        ("mfalcon_vs_one_pass", "mfalcon", "one_pass"),
    ], ctx)


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = timed({"mm": lambda: a @ b}, reps)["mm"]
    return 2 * n**3 / t / 1e9


def bench_training(rows: int, reps: int, peak_n: int) -> None:
    lengths, source = ml1m_training_lengths()
    lens = lengths[np.random.default_rng(1).choice(len(lengths), rows, replace=False)]
    batch = make_batch(lens, 3952)
    model = hstu(3952, 200, 50, 8, 2, 25)  # HSTU-large ML-1M
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    tokens = int(lens.sum())
    valid = int(lens.sum())
    K, d = 128, 50
    flops = 3 * (encoder_flops(model.config, lens) + 2 * valid * (K + 1) * d)

    def step(jagged: bool, bf16: bool):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                user = jagged_encode_batch(model, batch) if jagged else model.encode(batch)
            loss = sampled_softmax_loss(user.float(), batch.targets, model.item_vectors, 3952, K, 0.05, "per_sequence")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    bf16 = native_bf16("cpu")  # emulated bf16 is never used by genrec (resolve_autocast), so not timed
    fns = {"plain_fp32": step(False, False), "jagged_fp32": step(True, False)}
    if bf16:
        fns |= {"plain_bf16": step(False, True), "jagged_bf16": step(True, True)}
    t_ = timed(fns, reps)
    peaks = {"fp32": matmul_peak(torch.float32, peak_n, reps), "bf16": matmul_peak(torch.bfloat16, peak_n, reps)}
    for dt, p in peaks.items():
        row(f"train/matmul_peak/{dt}", p, "GFLOP/s", f"torch.mm {peak_n}x{peak_n}, {torch.get_num_threads()} threads")
    what = f"one step, {rows} rows, {tokens} tokens, HSTU-large ML-1M (d=50, 8 layers, 2x25), {source}"
    for name, t in t_.items():
        dt = name.split("_")[1]
        row(f"train/tokens_per_s/{name}", tokens / t, "tokens/s", f"{t * 1e3:.0f} ms per step; {what}")
        row(f"train/gflops/{name}", flops / t / 1e9, "GFLOP/s", f"model FLOPs {flops / 1e9:.2f} GFLOP per step")
        row(f"train/peak_fraction/{name}", flops / t / 1e9 / peaks[dt], "fraction", f"of the {dt} matmul peak")
    pairs = [("jagged_vs_plain_fp32", "jagged_fp32", "plain_fp32")]
    if bf16:
        pairs += [("jagged_vs_plain_bf16", "jagged_bf16", "plain_bf16"), ("bf16_vs_fp32_jagged", "jagged_bf16", "jagged_fp32")]
    ratio_rows("train", t_, pairs, what)


def bench_loss_paths(rows: int, reps: int) -> None:
    """One ML-1M HSTU training step (the configs' per-position sampled softmax, 128 negatives, jagged encoder),
    with the per-position logits computed by sparse products (``sampled_logits``) vs a full-catalogue product."""
    lengths, source = ml1m_training_lengths()
    lens = lengths[np.random.default_rng(2).choice(len(lengths), rows, replace=False)]
    num_items = 3706
    batch = make_batch(lens, num_items)
    model = hstu(num_items, 200, 50, 2, 1, 50)
    model.config.attention_impl = "jagged"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))

    def step(path: str):
        def run():
            user = model.encode(batch)
            loss = sampled_softmax_loss(user, batch.targets, model.item_vectors, num_items, 128, 0.05, "per_position",
                                        normalizer=float(lens.sum()), per_position_path=path)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    t_ = timed({"sparse": step("sparse"), "full": step("full")}, reps)
    ratio_rows("loss/per_position", t_, [("sparse_vs_full_catalogue", "sparse", "full")],
               f"one training step, HSTU ML-1M config (d=50, 2 layers, jagged), {rows} rows ({int(lens.sum())} "
               f"positions), 128 negatives per position, {num_items} items; {source}")


def bench_epochs(threads: int, max_steps: int = 0) -> None:
    """Wall-clock time of one ML-1M training epoch (no evaluation) of each frozen config, run one after the other in
    this process: SASRec, HSTU, HSTU-large, HSTU-large without the native kernel, with bf16 autocast, and with
    per-batch shared negatives (the loss of the plain-PyTorch reference figure)."""
    import tempfile

    from genrec.config import load_config
    from genrec.data.dataset import prepare_data
    from genrec.ops import native
    from genrec.train.loop import train

    cases = [("sasrec", "sasrec", []), ("hstu", "hstu", []), ("hstu-large", "hstu-large", []),
             ("hstu-large/torch-passes", "hstu-large", []), ("hstu-large/bf16", "hstu-large", ["train.autocast=bfloat16"]),
             ("hstu-large/shared-negatives", "hstu-large", ["train.negatives=shared"])]  # fmt: skip
    if not native_bf16("cpu"):  # the bf16 config would run in fp32 here (resolve_autocast)
        cases = [c for c in cases if c[0] != "hstu-large/bf16"]
    data = None
    times = {}
    for name, cfg_name, extra in cases:
        torch_passes = name.endswith("/torch-passes")  # the blocked engine without the native kernel
        with tempfile.TemporaryDirectory() as tmp, (native.disabled() if torch_passes else contextlib.nullcontext()):
            cfg = load_config(ROOT / "configs" / "ml-1m" / f"{cfg_name}.yaml", [
                *([f"data.data_dir={DATA_DIR}"] if DATA_DIR else []), f"output_dir={tmp}", "train.epochs=1",
                f"train.num_threads={threads}", f"train.max_steps_per_epoch={max_steps}", *extra])  # fmt: skip
            data = data or prepare_data(cfg.data)
            train(cfg, data=data, progress=False)
            times[name] = json.loads(open(Path(tmp) / "log.jsonl").readline())["train_seconds"]
        row(f"epoch/ml-1m/{name}", times[name], "s", f"one training epoch of configs/ml-1m/{cfg_name}.yaml "
            f"{' '.join(extra)} ({threads} threads, no evaluation{f', first {max_steps} steps only' if max_steps else ''}"
            f"{'; attention without the native kernel' if torch_passes else ''})")  # fmt: skip
    if max_steps:  # a smoke run: partial epochs say nothing about the ratios
        return
    row("epoch/ml-1m/hstu_vs_sasrec", times["sasrec"] / times["hstu"], "x", "SASRec epoch time / HSTU epoch time")
    row("epoch/ml-1m/hstu-large_vs_50s", PLAIN_BASELINE_SECONDS / times["hstu-large"], "x",
        f"{PLAIN_BASELINE} / this HSTU-large epoch")
    if "hstu-large/bf16" in times:
        row("epoch/ml-1m/hstu-large-bf16_vs_50s", PLAIN_BASELINE_SECONDS / times["hstu-large/bf16"], "x",
            f"{PLAIN_BASELINE} / this HSTU-large epoch, bf16 autocast")
    row("epoch/ml-1m/hstu-large_native_vs_torch_passes", times["hstu-large/torch-passes"] / times["hstu-large"], "x",
        "HSTU-large epoch with the attention's PyTorch elementwise passes / with the native kernel")


def bench_stochastic_length() -> None:
    lengths, source = ml1m_training_lengths()
    tail = long_tail_lengths(20000, 4096, with_cap_row=False)
    for alpha in (1.6, 1.8, 2.0):
        row(f"stochastic_length/ml-1m/alpha={alpha}", expected_sparsity(lengths, 200, alpha), "fraction",
            f"expected fraction of tokens dropped, N=200, {source}")
        row(f"stochastic_length/long-tail/alpha={alpha}", expected_sparsity(tail, 4096, alpha), "fraction",
            "expected fraction of tokens dropped, N=4096, synthetic lognormal(5, 1.5) lengths")


# ------------------------------------------------------------------------------------------------------------ GPU


def timed_cuda(fns: dict, reps: int) -> dict[str, float]:
    """``timed`` for CUDA work: the device is synchronised around every call, so each time covers its kernels."""

    def synced(f):
        def run():
            f()
            torch.cuda.synchronize()

        return run

    torch.cuda.synchronize()
    return timed({name: synced(f) for name, f in fns.items()}, reps)


def bench_gpu(lengths: list[int], reps: int, rows: int) -> None:
    """The paper's §5 comparison on a CUDA device: HSTU attention through the Triton kernel (jagged, causal, relative
    position + time bias) against PyTorch's fused causal SDPA (FlashAttention where available), fwd+bwd, bf16, one
    sequence of each length, 4 heads x 64 (the paper reports 5.3-15.2x at 8k); and one HSTU-large ML-1M training
    step in bf16 through the Triton jagged path against the padded PyTorch path."""
    from genrec.ops.triton_hstu import triton_jagged_hstu_attention

    dev, dtype, h, dim = torch.device("cuda"), torch.bfloat16, 4, 64
    name = torch.cuda.get_device_name(dev)
    for N in lengths:
        g = torch.Generator().manual_seed(N)
        q, k, v = ((torch.randn(N, h, dim, generator=g) * 0.3).to(dev, dtype).requires_grad_() for _ in range(3))
        ts = torch.cumsum(torch.randint(0, 100_000, (N + 1,), generator=g), 0).to(dev)
        layer = HSTULayer(HSTUConfig(num_items=1, max_len=N, num_heads=h, attention_dim=dim, linear_dim=dim)).to(dev)
        pos_w, ts_w = layer.rab.pos_w, layer.rab.ts_w
        offsets = torch.tensor([0, N], device=dev)
        has_time = torch.ones(1, dtype=torch.bool, device=dev)
        qh, kh, vh = (x.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for x in (q, k, v))  # [1, h, N, d]
        fns = {
            "sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True), qh, kh, vh),
            "triton": fwd_bwd(lambda: triton_jagged_hstu_attention(q, k, v, offsets, pos_w, ts_w, ts[:-1], ts[1:],
                                                                   has_time, 128, float(N)), q, k, v, pos_w, ts_w),
        }
        t_ = timed_cuda(fns, reps)
        ratio_rows(f"gpu/attention/bf16/N={N}", t_, [("triton_vs_sdpa", "triton", "sdpa")],
                   f"fwd+bwd, 1 sequence, 4 heads x 64, bf16, rab = position + time, {name}")
    lengths_ml, source = ml1m_training_lengths()
    lens = lengths_ml[np.random.default_rng(1).choice(len(lengths_ml), rows, replace=False)]
    batch = make_batch(lens, 3952).to(dev)
    model = hstu(3952, 200, 50, 8, 2, 25).to(dev)  # HSTU-large ML-1M
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))

    def step(jagged: bool):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                user = jagged_encode_batch(model, batch, engine="triton") if jagged else model.encode(batch)
            loss = sampled_softmax_loss(user.float(), batch.targets, model.item_vectors, 3952, 128, 0.05, "per_sequence")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    t_ = timed_cuda({"padded_bf16": step(False), "triton_bf16": step(True)}, reps)
    what = f"one step, {rows} rows, {int(lens.sum())} tokens, HSTU-large ML-1M (d=50, 8 layers, 2x25), {source}, {name}"
    for key, t in t_.items():
        row(f"gpu/train/tokens_per_s/{key}", int(lens.sum()) / t, "tokens/s", f"{t * 1e3:.1f} ms per step; {what}")
    ratio_rows("gpu/train", t_, [("triton_vs_padded_bf16", "triton_bf16", "padded_bf16")], what)


# ---------------------------------------------------------------------------------------------------------- main

TABLE_START, TABLE_END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"
DOC = ROOT / "docs" / "performance.md"


def markdown(rows: list[dict]) -> str:
    """The docs/performance.md table: every row of results/speed.json, its value, its detail (without the torch
    note) and the CPU it ran on (rows written before the CPU was recorded say so)."""
    lines = ["| row | value | what was timed | measured | CPU |", "|---|---:|---|---|---|"]
    for r in rows:
        v = r["value"]
        value = f"{v:.2f}x" if r["unit"] == "x" else (f"{v:.3f} {r['unit']}" if v < 10 else f"{v:,.0f} {r['unit']}")
        what = r["detail"].split(" [torch")[0].replace("|", "/")
        cpu = r.get("cpu", "x86-64, model not recorded")
        lines.append(f"| `{r['name']}` | {value} | {what} | {r.get('measured', 'earlier')} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run with small shapes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=None, help="rounds per measurement (default 5, quick 2)")
    p.add_argument("--out", default=str(ROOT / "results" / "speed.json"))
    p.add_argument("--sections", nargs="*", choices=SECTIONS + GPU_SECTIONS, default=None,
                   help="default: all CPU sections; with --device cuda: gpu")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the GPU section (needs a CUDA device and Triton: pip install genrec[gpu])")
    p.add_argument("--replace", action="store_true", help="overwrite --out instead of merging rows into it")
    p.add_argument("--table", action="store_true", help="only rewrite the docs/performance.md table from results/speed.json")
    p.add_argument("--data-dir", default=None, help="where ML-1M is (else $GENREC_DATA_DIR, then the cache directory)")
    p.add_argument("--isa", choices=ISA_CHOICES, default="native", help=ISA_HELP + " (fp32 rows only)")
    args = p.parse_args(argv)
    if isa_env_missing(args.isa):
        p.error(f"--isa {args.isa}: run this script directly (it sets the environment and starts again)")
    if args.sections is None:
        args.sections = list(GPU_SECTIONS if args.device == "cuda" else SECTIONS)
    if ("gpu" in args.sections) != (args.device == "cuda") or (args.device == "cuda" and len(args.sections) > 1):
        p.error("the gpu section runs alone and only with --device cuda; the other sections run on the CPU")
    if args.device == "cuda":
        from genrec.ops.jagged import triton_available

        if not torch.cuda.is_available():
            p.error("--device cuda: this PyTorch sees no CUDA device")
        if not triton_available():
            p.error("--device cuda: Triton is not installed (pip install genrec[gpu])")
    if args.table:
        from readme_table import write_between_markers

        table = markdown(json.loads((ROOT / "results" / "speed.json").read_text()))
        write_between_markers(DOC, TABLE_START, TABLE_END, table)
        print(table)
        return 0
    global DATA_DIR
    DATA_DIR = args.data_dir
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    # bf16 rows only where the CPU computes bf16 natively: elsewhere genrec never runs bf16 (resolve_autocast), and
    # an emulated bf16 pass takes 7-15x the fp32 time
    dtypes = [torch.float32, torch.bfloat16] if native_bf16("cpu") and args.isa == "native" else [torch.float32]
    if len(dtypes) == 1:
        print(f"no native bf16 on this CPU ({machine_summary()}): fp32 rows only", flush=True)
    quick = {
        "attention": lambda: bench_attention([256], reps, dtypes, plain_max=256),
        "layer": lambda: bench_layer([256], reps, plain_max=256),
        "jagged": lambda: bench_jagged(ml_rows=32, tail_rows=4, tail_cap=512, reps=reps),
        "mfalcon": lambda: bench_mfalcon(history=128, candidates=128, per_candidate=16, reps=reps),
        "ranking": lambda: bench_ranking(history=50, candidates=20, reps=reps),
        "training": lambda: bench_training(rows=16, reps=reps, peak_n=512),
        "loss": lambda: bench_loss_paths(rows=16, reps=reps),
        "epochs": lambda: bench_epochs(args.threads, max_steps=2),  # two steps per "epoch": a smoke run
        "stochastic_length": bench_stochastic_length,
        "gpu": lambda: bench_gpu([1024], reps, rows=16),
    }
    full = {
        "attention": lambda: bench_attention([256, 1024, 4096], reps, dtypes, plain_max=4096),
        "layer": lambda: bench_layer([256, 1024, 4096], reps, plain_max=4096),
        "jagged": lambda: bench_jagged(ml_rows=128, tail_rows=8, tail_cap=4096, reps=reps),
        "mfalcon": lambda: bench_mfalcon(history=512, candidates=1024, per_candidate=128, reps=reps),
        "ranking": lambda: bench_ranking(history=200, candidates=200, reps=reps),
        "training": lambda: bench_training(rows=128, reps=reps, peak_n=2048),
        "loss": lambda: bench_loss_paths(rows=128, reps=reps),
        "epochs": lambda: bench_epochs(args.threads),
        "stochastic_length": bench_stochastic_length,
        "gpu": lambda: bench_gpu([1024, 2048, 4096, 8192], reps, rows=128),
    }
    for name in args.sections:
        (quick if args.quick else full)[name]()
    machine = machine_info()
    cpu = machine_summary(machine)  # the CPU, its ISA (avx2 / avx512f / avx512_bf16 / amx), torch and the BLAS
    meta = f"{args.threads} threads, {cpu}"
    for r in ROWS:
        r["detail"] += f" [{meta}{', quick' if args.quick else ''}]"
    measured = time.strftime("%Y-%m-%d")
    for r in ROWS:
        r["measured"] = measured
        r["cpu"] = cpu
        r["machine"] = machine
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # rows of the sections not run this time stay (a section's rows are replaced by name)
    old = [] if args.replace or not out.exists() else json.loads(out.read_text())
    names = {r["name"] for r in ROWS}
    rows = [r for r in old if r["name"] not in names] + ROWS
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {len(ROWS)} rows to {out} ({len(rows) - len(ROWS)} rows of other sections kept)")
    if out.resolve() == (ROOT / "results" / "speed.json").resolve() and not args.quick:
        from readme_table import write_between_markers

        write_between_markers(DOC, TABLE_START, TABLE_END, markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
