"""How much does HSTU's time bias matter on ML-1M? (A benchmark, not a test.)

Trains the ML-1M HSTU config with the time term switched off (``model.use_time_bias=false``, everything else equal)
and evaluates it and the main HSTU run (``runs/quality/ml-1m/hstu``, trained by ``bench/quality.py``) on the test
split, separately for the users with timestamps and those without (on a copy of ML-1M where only some users have
timestamps; with the official files every user has them and the second group is empty). Writes
``results/time_ablation.json``.

    python bench/time_ablation.py --threads 1                       # trains the no-time run, then evaluates
    python bench/time_ablation.py --runs runs/quality/ml-1m/hstu runs/quality/ml-1m/sasrec --out results/time_subsets.json
                                                                    # only evaluates existing runs on the subsets

``--hide-time`` adds a row per run: the users with timestamps evaluated once more with their timestamps hidden from
the model at inference (``has_time`` False, as for the users without), i.e. how much that run's predictions for
those users lean on the time term. It needs no training, unlike the no-time run. From it the script also projects
the all-user figure had every user had timestamps: the users without keep their metric times the lift the time term
gives the users with (with / hidden), weighted by the two groups' sizes. That assumes the time term would help both
halves of the users alike; it is an estimate, labelled as one, never a measured result.
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
    p.add_argument("--data-dir", default=None,
                   help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience of the no-time run (as the main run)")
    p.add_argument("--time-budget-minutes", type=float, default=0.0, help="wall-clock budget of the no-time run (0: none)")
    p.add_argument("--main-run", default=str(ROOT / "runs" / "quality" / "ml-1m" / "hstu"))
    p.add_argument("--runs", nargs="*", help="evaluate these run directories only (no training)")
    p.add_argument("--out", default=str(ROOT / "results" / "time_ablation.json"))
    p.add_argument("--hide-time", action="store_true",
                   help="also evaluate the users with timestamps with their timestamps hidden at inference")
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
                          [*([f"data.data_dir={args.data_dir}"] if args.data_dir else []), "model.use_time_bias=false",
                           f"train.patience={args.patience}", f"train.time_budget_minutes={args.time_budget_minutes}",
                           f"output_dir={no_time_dir}"])  # fmt: skip
        train(cfg, overwrite=True, progress=False)
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
        if args.hide_time:
            users = "with-timestamps, time hidden"
            metrics = _evaluate_time_hidden(rec)
            rows.append({"model": name, "run": str(run.relative_to(ROOT)), "best_epoch": best, "users": users,
                         "protocol": protocol_for(rec, "with-timestamps").to_dict(), "time_hidden_at_inference": True,
                         "metrics": metrics})  # fmt: skip
            print(f"{name:<45} {users:<20} HR@10 {metrics['HR@10']:.4f} NDCG@10 {metrics['NDCG@10']:.4f} (n={metrics['count']})")
            by_users = {r["users"]: r["metrics"] for r in rows if r["run"] == str(run.relative_to(ROOT))}
            projected = project_all_timed(by_users)
            rows.append({"model": name, "run": str(run.relative_to(ROOT)), "best_epoch": best,
                         "users": "all, projected with timestamps for everyone (estimate)", "estimate": True,
                         "metrics": projected})  # fmt: skip
            print(f"{name:<45} {'all, projected':<20} HR@10 {projected['HR@10']:.4f} NDCG@10 {projected['NDCG@10']:.4f} "
                  "(estimate)")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def project_all_timed(by_users: dict[str, dict], keys=("HR@10", "NDCG@10", "HR@50", "NDCG@50")) -> dict:
    """All-user metrics had the users without timestamps had them: their metric times the time term's lift on the
    users with timestamps (with / hidden), weighted by group size. ``by_users`` maps "with-timestamps",
    "without-timestamps" and "with-timestamps, time hidden" to metric dicts."""
    timed, untimed, hidden = (by_users[k] for k in ("with-timestamps", "without-timestamps", "with-timestamps, time hidden"))
    n_t, n_u = timed["count"], untimed["count"]
    out = {k: (n_t * timed[k] + n_u * untimed[k] * timed[k] / hidden[k]) / (n_t + n_u) for k in keys}
    return {**out, "count": n_t + n_u}


def protocol_for(rec, users: str):
    import dataclasses

    from genrec.eval.protocol import protocol_from_config

    return dataclasses.replace(protocol_from_config(rec.config_, "test"), users=users)


def _evaluate_time_hidden(rec) -> dict:
    """Test metrics of the users with timestamps, with ``has_time`` False for every history the model scores."""
    import numpy as np

    from genrec.data.dataset import prepare_data
    from genrec.eval.evaluate import evaluate, model_score_fn

    data = prepare_data(rec.config_.data)
    score = model_score_fn(rec.model_, rec.config_.data.max_len)
    hidden = lambda hist, htimes, qtimes, has_time: score(hist, htimes, qtimes, np.zeros_like(has_time))  # noqa: E731
    return evaluate(hidden, data.sequences, protocol_for(rec, "with-timestamps"), rec.config_.train.eval_batch_size)


if __name__ == "__main__":
    sys.exit(main())
