"""Does HSTU's time bias matter on ML-1M, given that the copy here has timestamps for users 1..2999 only?

Trains the ML-1M HSTU config with the time term switched off (``model.use_time_bias=false``, everything else equal)
and evaluates it and the main HSTU run (``runs/quality/ml-1m/hstu``, trained by ``bench/quality.py``) on the test
split, separately for the users with timestamps and those without. Writes ``results/time_ablation.json``.

    python bench/time_ablation.py --threads 1                       # trains the no-time run, then evaluates
    python bench/time_ablation.py --runs runs/quality/ml-1m/hstu runs/quality/ml-1m/sasrec --out results/time_subsets.json
                                                                    # only evaluates existing runs on the subsets
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience of the no-time run (as the main run)")
    p.add_argument("--time-budget-minutes", type=float, default=0.0, help="wall-clock budget of the no-time run (0: none)")
    p.add_argument("--main-run", default=str(ROOT / "runs" / "quality" / "ml-1m" / "hstu"))
    p.add_argument("--runs", nargs="*", help="evaluate these run directories only (no training)")
    p.add_argument("--out", default=str(ROOT / "results" / "time_ablation.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    from genrec.api import Recommender
    from genrec.config import load_config
    from genrec.train.loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    no_time_dir = ROOT / "runs" / "quality" / "ml-1m" / "hstu-no-time-bias"
    if args.runs:
        runs = [(Path(r).name, Path(r).resolve()) for r in args.runs]
    else:
        runs = [("hstu (time bias on where timestamps exist)", Path(args.main_run)), ("hstu, time bias off", no_time_dir)]
    if not args.runs and not (no_time_dir / "results.json").exists():
        cfg = load_config(ROOT / "configs/ml-1m/hstu.yaml",
                          [f"data.data_dir={args.data_dir}", "model.use_time_bias=false",
                           f"train.patience={args.patience}", f"train.time_budget_minutes={args.time_budget_minutes}",
                           f"output_dir={no_time_dir}"])  # fmt: skip
        train(cfg, progress=False)
    rows = []
    missing = [str(run) for _, run in runs if not (run / "results.json").exists()]
    if missing:
        raise SystemExit(f"not finished (no results.json): {', '.join(missing)}; train it, then rerun this script "
                         "(a finished no-time run is not trained again)")
    for name, run in runs:
        rec = Recommender.load(run, data_dir=args.data_dir)
        best = json.loads((run / "results.json").read_text())["best_epoch"]
        for users in ("with-timestamps", "without-timestamps", "all"):
            protocol, metrics = rec.evaluate(target="test", users=users)
            rows.append({"model": name, "run": str(run.relative_to(ROOT)), "best_epoch": best, "users": users,
                         "protocol": protocol.to_dict(), "metrics": metrics})  # fmt: skip
            print(f"{name:<45} {users:<20} HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} (n={metrics['count']})")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
