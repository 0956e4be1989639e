"""Shared, per-sequence or per-position negatives? A short side-by-side on ML-1M HSTU (not a test).

Trains the ML-1M HSTU config for a fixed number of epochs under each negative-sampling setting (one after the other,
same threads) and records the validation NDCG@10 / HR@10 after every epoch and the training seconds per epoch.
Validation only: this is a model-selection question, so the test split is not looked at.

    python bench/negatives.py --epochs 8 --threads 1          # writes results/negatives.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "per-position-128": ["train.negatives=per_position", "train.num_negatives=128"],  # the reference
    "per-sequence-128": ["train.negatives=per_sequence", "train.num_negatives=128"],  # genrec's ML-1M choice
    "shared-128": ["train.negatives=shared", "train.num_negatives=128"],
    "shared-512": ["train.negatives=shared", "train.num_negatives=512"],
}


def run(name: str, epochs: int, threads: int, config: str, data_dir: str | None) -> dict:
    import torch

    from genrec.config import load_config
    from genrec.train.loop import train

    torch.set_num_threads(threads)
    logging.getLogger("bench.negatives").info("setting %s", name)
    run_dir = ROOT / "runs" / "negatives" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a continuation of an older log
    overrides = SETTINGS[name] + [
        f"train.epochs={epochs}", f"train.patience={epochs}", f"output_dir={run_dir}",
        *([f"data.data_dir={data_dir}"] if data_dir else []),
    ]  # fmt: skip
    cfg = load_config(ROOT / config, overrides)
    train(cfg, overwrite=True, progress=False)
    rows = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    return {
        "setting": name,
        "config": config,
        "overrides": SETTINGS[name],
        "protocol": "loo-valid/full/exclude-seen/hist200",
        "epochs": [
            {"epoch": r["epoch"], "train_seconds": r["train_seconds"], "NDCG@10": r["valid"]["NDCG@10"], "HR@10": r["valid"]["HR@10"]}
            for r in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the runs go one after the other)")
    p.add_argument("--config", default="configs/ml-1m/hstu.yaml")
    p.add_argument("--data-dir", default=None,
                   help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS))
    p.add_argument("--out", default="results/negatives.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = []
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        rows.append(run(setting, args.epochs, args.threads, args.config, args.data_dir))
        out.write_text(json.dumps(rows, indent=2) + "\n")  # after every setting, so a stopped run keeps its rows
    for r in rows:
        last = r["epochs"][-1]
        best = max(e["NDCG@10"] for e in r["epochs"])
        secs = sorted(e["train_seconds"] for e in r["epochs"])[len(r["epochs"]) // 2]
        print(f"{r['setting']:<18} best valid NDCG@10 {best:.4f}  last {last['NDCG@10']:.4f}  median {secs:.1f} s/epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
