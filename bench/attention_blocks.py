"""Blocked HSTU attention forward+backward time by block size (a benchmark, not a test).

Checks ``genrec.ops.hstu_attention.choose_block`` against measurement, and times one build of the attention engine
(run it at two commits to compare two versions of the native kernel). One sequence, 4 heads x 64, fp32, position and
time bias, the same inputs as ``bench/speed.py``'s attention rows; each time is the median of ``--reps`` runs after
one warm-up, the block sizes of one length interleaved round by round.

    python bench/attention_blocks.py                                  # lengths 256-4096, blocks 64 / 128 / 256 / auto
    python bench/attention_blocks.py --lengths 1024 4096 --blocks auto --reps 5 --out /tmp/blocks.json
    python bench/attention_blocks.py --isa avx2 --out results/attention_blocks_avx2.json   # as on an AVX2-only CPU

Rows (``results/attention_blocks.json`` by default): ``{"length", "block", "chosen", "ms", "reps", "machine"}``;
block "auto" is ``choose_block``'s pick, named in ``chosen``; ``machine`` is ``genrec.runtime.machine_info()`` (the
CPU, its ISA, and the ``--isa`` limits in force).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from isa import ISA_CHOICES, ISA_HELP, isa_env_missing, reexec_for_isa

if __name__ == "__main__":
    reexec_for_isa(sys.argv[1:])  # --isa avx2: start again with the settings in the environment, before torch loads

import torch  # noqa: E402
from readme_table import write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.models.hstu import HSTUConfig, HSTULayer  # noqa: E402
from genrec.ops.hstu_attention import blocked_hstu_attention, choose_block  # noqa: E402
from genrec.runtime import machine_info  # noqa: E402

HEADS, DIM, BUCKETS = 4, 64, 128


def inputs(N: int):
    g = torch.Generator().manual_seed(N)
    q, k, v = ((torch.randn(1, HEADS, N, DIM, generator=g) * 0.3).requires_grad_() for _ in range(3))
    ts = torch.cumsum(torch.randint(0, 100_000, (1, N + 1), generator=g), 1)
    layer = HSTULayer(HSTUConfig(num_items=1, max_len=N, num_heads=HEADS, attention_dim=DIM, linear_dim=DIM))
    return q, k, v, layer.rab.pos_w, layer.rab.ts_w, ts[:, :-1], ts[:, 1:], torch.tensor([float(N)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--blocks", nargs="+", default=["64", "128", "256", "auto"], help='sizes, or "auto"')
    p.add_argument("--reps", type=int, default=0, help="runs per measurement (default: 30 at 256 down to 3 at 4096)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "attention_blocks.json"))
    p.add_argument("--isa", choices=ISA_CHOICES, default="native", help=ISA_HELP)
    args = p.parse_args(argv)
    if isa_env_missing(args.isa):
        p.error(f"--isa {args.isa}: run this script directly (it sets the environment and starts again)")
    machine = machine_info()
    torch.set_num_threads(args.threads)
    rows = []
    for N in args.lengths:
        q, k, v, pos_w, ts_w, t, qt, norm = inputs(N)
        has_time = torch.ones(1, dtype=torch.bool)
        chosen = choose_block([N], HEADS, DIM)
        blocks = {b: chosen if b == "auto" else int(b) for b in args.blocks}
        reps = args.reps or max(3, min(30, 30 * 256 // N))

        def run(block: int) -> float:
            start = time.perf_counter()
            out = blocked_hstu_attention(q, k, v, pos_w, ts_w, t, qt, has_time, BUCKETS, norm, block=block)
            out.sum().backward()
            return time.perf_counter() - start

        times: dict[str, list[float]] = {b: [] for b in blocks}
        for b, block in blocks.items():
            run(block)  # warm-up
        for _ in range(reps):
            for b, block in blocks.items():
                times[b].append(run(block))
        for b, block in blocks.items():
            ms = statistics.median(times[b]) * 1e3
            rows.append({"length": N, "block": b, "chosen": chosen, "ms": round(ms, 2), "reps": reps,
                         "machine": machine})
            print(f"N={N:5d}  block {b:>4} ({block:3d})  {ms:8.1f} ms", flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
