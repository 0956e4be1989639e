"""Ranking quality on ML-1M like / love (user-last split): floors, DLRM, DIN and the HSTU ranker (a benchmark, not a
test).

Every model is trained with ``genrec.train.ranking.train_ranker`` (epoch chosen on the validation part, mean NE over
the tasks by default; the test part evaluated once) for each seed, into ``runs/ranking/<dataset>/<model>-<variant>/
seed<seed>``. Each run's saved test predictions are then compared with the baseline model's by a paired user
bootstrap (``genrec.eval.ranking_metrics.paired_bootstrap``): per seed (against the baseline's run with the same
seed, or its only run when it has one seed) and over all seeds (the seed-mean difference).

    python bench/ranking.py --models popularity logreg dlrm hstu-ranker --seeds 0 1 2 --baseline popularity
    python bench/ranking.py --models popularity logreg --seeds 0 --epochs 1 --max-steps 5 --out /tmp/smoke.json

Rows (``results/ranking.json`` by default; rows with the same dataset, model, variant, task, split and seed are
replaced, others kept)::

    {"dataset", "model", "variant", "task", "split", "seed" (an int, or "mean" for the seed-mean row),
     "metrics": {"AUC", "GAUC", "NE", "LogLoss", "calibration"},
     "ci": {"baseline", "variant", "confidence", "num_resamples",
            "AUC" | "GAUC" | "NE" | "LogLoss": {"diff", "low", "high", "excludes_zero"}} or null for the baseline,
     "seconds" (training + evaluation wall-clock of the run; the sum over seeds for the mean row),
     "epochs", "smoke" (true when --max-steps cut the epochs short: not a result)}

The data is found through --data-dir, else ``$GENREC_DATA_DIR``, else the cache directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.config import (  # noqa: E402
    RankingDataConfig,
    RankingModelConfig,
    RankingRunConfig,
    RankingTrainConfig,
)
from genrec.data.ranking import load_ranking_dataset  # noqa: E402
from genrec.eval.ranking_metrics import paired_bootstrap  # noqa: E402
from genrec.io import write_json  # noqa: E402
from genrec.models.ranking_floors import LogisticRegressionRanker  # noqa: E402
from genrec.train.ranking import available_rankers, load_predictions, train_ranker  # noqa: E402

RESULTS = ROOT / "results" / "ranking.json"
DEFAULT_SPLITS = {"ml-1m": "user-last", "taobao": "global-time", "taobao-userbehavior-head": "global-time",
                  "kuairand": "global-time", "kuairand-27k-like-hate-subset": "global-time"}  # fmt: skip
METRIC_NAMES = {"auc": "AUC", "gauc": "GAUC", "ne": "NE", "log_loss": "LogLoss", "calibration": "calibration"}
# "<model>:<variant>" presets; a model given without a variant gets "default"
PRESETS: dict[tuple[str, str], dict] = {
    ("popularity", "default"): {},
    ("logreg", "default"): {"num_buckets": 1 << 20},
    ("dlrm", "default"): {"embedding_dim": 16, "bottom_mlp": [64], "top_mlp": [64, 32], "history_pooling": "mean"},
    ("dlrm", "action-weighted"): {"embedding_dim": 16, "bottom_mlp": [64], "top_mlp": [64, 32],
                                  "history_pooling": "action_weighted"},  # fmt: skip
    ("din", "default"): {"embedding_dim": 16},
    ("hstu-ranker", "default"): {"variant": "summed"},
    ("hstu-ranker", "interleaved"): {"variant": "interleaved"},
}


# models whose config takes task_base_rates (output bias logit(rate) per task at initialisation)
BASE_RATE_MODELS = ("dlrm", "din", "hstu-ranker", "logreg")


def parse_model(text: str) -> tuple[str, str]:
    name, _, variant = text.partition(":")
    variant = variant or "default"
    if (name, variant) not in PRESETS:
        raise SystemExit(f"unknown model {text!r}; known: {', '.join(f'{n}:{v}' for n, v in PRESETS)}")
    if name not in available_rankers():
        raise SystemExit(f"model {name!r} is not available in this installation ({', '.join(available_rankers())})")
    return name, variant


def run_config(args, name: str, variant: str, seed: int) -> RankingRunConfig:
    return RankingRunConfig(
        data=RankingDataConfig(dataset=args.dataset, data_dir=args.data_dir, split=args.split, n_eval=args.n_eval,
                               max_history=args.max_history, max_candidates=args.max_candidates),  # fmt: skip
        model=RankingModelConfig(name=name, params=model_params(args, name, variant)),
        train=RankingTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                                 weight_decay=args.weight_decay,
                                 select_metric=args.select_metric, seed=seed, num_threads=args.threads,
                                 device=args.device, max_steps_per_epoch=args.max_steps),  # fmt: skip
        output_dir=str(run_root(args) / f"{name}-{variant}" / f"seed{seed}"),
    )


def model_params(args, name: str, variant: str) -> dict:
    """The preset's parameters, plus ``task_base_rates`` (the training part's base rates) with --init-base-rates for
    the models whose output biases can start there."""
    params = dict(PRESETS[(name, variant)])
    if args.init_base_rates and name in BASE_RATE_MODELS:
        params["task_base_rates"] = list(args.base_rates)
    return params


def floor_model(args, ds, name: str, seed: int):
    """With --init-base-rates, the logistic regression built here with its biases at the base rates (the training
    loop's factory does not take that parameter for the floors); None otherwise (the loop builds the model)."""
    if not (args.init_base_rates and name == "logreg"):
        return None
    torch.manual_seed(seed)  # as the training loop seeds before building a model
    return LogisticRegressionRanker(ds.schema, num_buckets=PRESETS[("logreg", "default")]["num_buckets"], seed=seed,
                                    task_base_rates=args.base_rates)  # fmt: skip


def run_root(args) -> Path:
    """``<runs>/<dataset>`` for the dataset's default split, ``<runs>/<dataset>/<split>`` for another one, so that
    runs of two splits never share (and never overwrite) a directory."""
    root = Path(args.runs) / args.dataset
    default = DEFAULT_SPLITS.get(args.dataset)
    return root if args.split is None or args.split == default else root / args.split


def ci_entry(diffs: dict) -> dict:
    return {
        METRIC_NAMES[m]: {"diff": d.diff, "low": d.ci_low, "high": d.ci_high, "excludes_zero": d.excludes_zero}
        for m, d in diffs.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default=None, choices=["user-last", "global-time"],
                   help="default: the dataset's own (ML-1M user-last, Taobao and KuaiRand global-time)")
    p.add_argument("--n-eval", type=int, default=10)
    p.add_argument("--max-history", type=int, default=200)
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--models", nargs="+", default=["popularity", "logreg", "dlrm", "hstu-ranker"],
                   help="model or model:variant (see PRESETS)")  # fmt: skip
    p.add_argument("--baseline", default="popularity", help="model[:variant] every other model is compared with")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-base-rates", action="store_true",
                   help="start every learned model's output bias at logit(training base rate) per task (DLRM, DIN, "
                   "HSTU ranker); without it the biases start at 0, i.e. probability 0.5")
    p.add_argument("--select-metric", default="NE", choices=["NE", "AUC", "GAUC", "LogLoss"])
    p.add_argument("--max-steps", type=int, default=0, help=">0: cut every epoch to this many steps (smoke runs)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--runs", default=str(ROOT / "runs" / "ranking"))
    p.add_argument("--resume", action="store_true",
                   help="continue existing runs instead of replacing them (runs not started yet start fresh)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    models = [parse_model(m) for m in args.models]
    baseline = parse_model(args.baseline)
    if baseline not in models:
        models.insert(0, baseline)
    ds = load_ranking_dataset(args.dataset, data_dir=args.data_dir, split=args.split, n_eval=args.n_eval,
                              max_candidates=args.max_candidates)  # fmt: skip
    print(ds.describe(args.max_candidates), flush=True)
    args.dataset, args.split = ds.name, ds.split  # canonical name and resolved split (run directories, configs)
    if args.init_base_rates:
        rates = ds.counts("train", args.max_candidates)["base_rates"]
        args.base_rates = tuple(min(max(float(rates[t]), 1e-4), 1 - 1e-4) for t in ds.schema.tasks)
        print(f"output biases start at logit(training base rate): {dict(zip(ds.schema.tasks, args.base_rates))}")

    runs: dict[tuple[str, str], list[dict]] = {}
    for name, variant in models:
        for seed in args.seeds:
            config = run_config(args, name, variant, seed)
            start = time.perf_counter()
            resume = args.resume and (Path(config.output_dir) / "checkpoint.pt").exists()  # else a fresh run
            results = train_ranker(config, dataset=ds, model=floor_model(args, ds, name, seed), resume=resume,
                                   overwrite=not resume, progress=False)  # fmt: skip
            seconds = time.perf_counter() - start
            pred = load_predictions(Path(config.output_dir) / "test_predictions.npz")
            runs.setdefault((name, variant), []).append(
                {"seed": seed, "results": results, "pred": pred, "seconds": seconds})
            print(f"{name}:{variant} seed {seed}: best epoch {results['best_epoch']} {seconds:.0f}s", flush=True)
            if results["fitted_by_counting"]:
                break  # a counted floor does not depend on the seed: one run stands for all

    base_runs = runs[baseline]
    reference = base_runs[0]["pred"]
    rows = []
    for (name, variant), model_runs in runs.items():
        is_base = (name, variant) == baseline
        for k, task in enumerate(ds.schema.tasks):
            labels, users = reference.labels[:, k], reference.user_ids
            per_seed = []
            for run in model_runs:
                pred = load_predictions(Path(run["results"]["config"]["output_dir"]) / "test_predictions.npz",
                                        like=reference)  # the same candidates, in the same order  # fmt: skip
                metrics = {METRIC_NAMES[m]: run["results"]["test"]["metrics"][task][m] for m in METRIC_NAMES}
                ci = None
                if not is_base:
                    match = [b for b in base_runs if b["seed"] == run["seed"]] or base_runs[:1]
                    diffs = paired_bootstrap(pred.probs[:, k], match[0]["pred"].probs[:, k], labels, users,
                                             num_resamples=args.resamples, seed=0)  # fmt: skip
                    ci = {"baseline": baseline[0], "variant": baseline[1], "baseline_seed": match[0]["seed"],
                          "confidence": 0.95, "num_resamples": args.resamples, **ci_entry(diffs)}  # fmt: skip
                per_seed.append(metrics)
                rows.append(row(args, ds, name, variant, task, run["seed"], metrics, ci, run["seconds"],
                                run["results"]["epochs_run"]))  # fmt: skip
            if len(model_runs) > 1:
                mean = {m: float(np.mean([s[m] for s in per_seed])) for m in METRIC_NAMES.values()}
                ci = None
                if not is_base:
                    stack = np.stack([r["pred"].probs[:, k] for r in model_runs])  # [S, N]
                    base_stack = np.stack([b["pred"].probs[:, k] for b in base_runs])
                    diffs = paired_bootstrap(stack, base_stack, labels, users, num_resamples=args.resamples, seed=0)
                    ci = {"baseline": baseline[0], "variant": baseline[1], "baseline_seed": "mean",
                          "confidence": 0.95, "num_resamples": args.resamples, **ci_entry(diffs)}  # fmt: skip
                rows.append(row(args, ds, name, variant, task, "mean", mean, ci,
                                sum(r["seconds"] for r in model_runs), None))  # fmt: skip
    merge_rows(Path(args.out), rows)
    for r in rows:
        m = r["metrics"]
        line = f"{r['model']:>12}:{r['variant']:<16} {r['task']:<5} seed {r['seed']!s:<4} " + " ".join(
            f"{k} {fmt(m[k])}" for k in ("AUC", "GAUC", "NE", "LogLoss", "calibration"))
        if r["ci"] is not None:
            c = r["ci"]["AUC"]
            line += (f"  AUC - {args.baseline} {fmt(c['diff'], '+.4f')} "
                     f"[{fmt(c['low'], '+.4f')}, {fmt(c['high'], '+.4f')}]")
        print(line)
    return 0


def fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def row(args, ds, name, variant, task, seed, metrics, ci, seconds, epochs) -> dict:
    return {"dataset": ds.name, "model": name, "variant": variant, "task": task, "split": ds.split, "seed": seed,
            "metrics": metrics, "ci": ci, "seconds": round(seconds, 1), "epochs": epochs,
            "smoke": args.max_steps > 0}  # fmt: skip


def merge_rows(out: Path, rows: list[dict]) -> None:
    """Replace the rows with the same (dataset, model, variant, task, split, seed) in ``out``, keep the others."""

    def key(r: dict) -> tuple:
        return (r["dataset"], r["model"], r["variant"], r["task"], r["split"], str(r["seed"]))

    old = json.loads(out.read_text()) if out.exists() else []
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    write_json(out, merged)
    print(f"wrote {len(rows)} rows to {out} ({len(merged)} in all)")


if __name__ == "__main__":
    raise SystemExit(main())
