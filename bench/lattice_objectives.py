"""Multi-objective training study: fixed weights, uncertainty weighting, MGDA and PE-LTR on one multi-task ranker.

Every method trains the same ranker (DLRM by default, one linear head per task on a shared top MLP) with
``genrec.train.ranking.train_ranker`` and ``train.task_balancing=<method>`` (``genrec.train.multitask``), for each
seed, into ``runs/lattice/objectives/<dataset>/<model>-<method>/seed<seed>``. The epoch is chosen on the validation
part (mean NE over the tasks); the test part is scored once. Each method's saved test predictions are compared per
task with ``fixed``'s by a paired user bootstrap (``genrec.eval.ranking_metrics.paired_bootstrap``) of the seed-mean
metric difference: a method helps (hurts) a task only when the 95% interval excludes 0.

    python bench/lattice_objectives.py                                 # KuaiRand, DLRM, 4 methods x seeds 0 1
    python bench/lattice_objectives.py --model hstu-ranker --epochs 4  # the HSTU ranker (slower; see --help)
    python bench/lattice_objectives.py --dataset ml-1m --max-history 50
    python bench/lattice_objectives.py --markdown                      # the tables, from results/ only
    python bench/lattice_objectives.py --plot-only                     # results/pareto.png, from results/ only

Rows (``results/lattice_objectives.json``; rows with the same dataset, model, variant and task are replaced)::

    {"study": "objectives", "dataset", "model", "variant" (the method), "task", "seeds",
     "metrics": {"AUC", "GAUC", "NE", "LogLoss", "calibration"} (mean over seeds),
     "per_seed": [{"seed", "best_epoch", "epochs", metrics...}],
     "ci": null for fixed, else {"baseline": "fixed", "confidence", "num_resamples",
                                 "AUC" | "GAUC" | "NE" | "LogLoss": {"diff", "low", "high", "excludes_zero"}},
     "weights": mean over seeds of the weight the method put on the task's loss during the best epoch
                (mean over its steps; fixed: the task weight),
     "log_variances": uncertainty only, s_t after the best epoch (mean over seeds),
     "seconds": training + validation seconds summed over seeds, "seconds_per_epoch",
     "command", "protocol", "settings"}

``results/pareto.png`` (needs matplotlib; skipped with a message without it): per task, each method's AUC and NE
difference from fixed with its 95% interval, and the mean weight each method put on each task.

The data is found through --data-dir, else ``$GENREC_DATA_DIR``, else the cache directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

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
from genrec.train.multitask import BALANCERS, PE_LTR_BOUND_MASS  # noqa: E402
from genrec.train.ranking import load_predictions, train_ranker  # noqa: E402

STUDY = "objectives"
RESULTS = ROOT / "results" / "lattice_objectives.json"
PLOT = ROOT / "results" / "pareto.png"
METHODS = tuple(BALANCERS)  # fixed, uncertainty, mgda, pe-ltr
METRIC_NAMES = {"auc": "AUC", "gauc": "GAUC", "ne": "NE", "log_loss": "LogLoss", "calibration": "calibration"}
MODEL_PARAMS = {
    "dlrm": {"embedding_dim": 16, "bottom_mlp": [64], "top_mlp": [64, 32], "history_pooling": "mean"},
    "hstu-ranker": {"variant": "summed", "embedding_dim": 32, "num_blocks": 1, "num_heads": 2, "attention_dim": 16,
                    "linear_dim": 16},  # fmt: skip
    "din": {"embedding_dim": 16},
}
PROTOCOL = (
    "Each method trains the same ranker from the same seed (output biases at logit(training base rate)); epoch "
    "chosen on validation mean NE over the tasks, early stopping with the given patience; test part scored once. "
    "metrics: mean over seeds of each seed's test metric. ci: paired bootstrap over users (1000 resamples unless "
    "stated) of the seed-mean metric of the method minus that of fixed, on the same test candidates; 95% "
    "percentile interval."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="kuairand", help="kuairand (7 tasks), ml-1m (like, love) or taobao")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default=None, choices=["user-last", "global-time"])
    p.add_argument("--n-eval", type=int, default=10)
    p.add_argument("--model", default="dlrm", choices=sorted(MODEL_PARAMS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--task-weights", type=float, nargs="+", default=None,
                   help="train.task_weights (fixed: the weights; uncertainty: prior factors; PE-LTR: lower bounds "
                   f"{PE_LTR_BOUND_MASS} * w / sum(w)); default all 1")  # fmt: skip
    p.add_argument("--no-init-base-rates", action="store_true", help="leave the output biases at their default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help=">0: cut every epoch to this many steps (smoke runs)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--runs", default=str(ROOT / "runs" / "lattice" / STUDY))
    p.add_argument("--resume", action="store_true", help="reuse finished runs (their predictions are read again)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--plot", default=str(PLOT))
    p.add_argument("--markdown", action="store_true", help="print the tables of --out and exit")
    p.add_argument("--plot-only", action="store_true", help="draw --plot from --out and exit")
    args = p.parse_args(argv)
    if "fixed" not in args.methods:
        p.error("--methods must include fixed: every other method is compared with it")
    args.command = clean_command(sys.argv[1:] if argv is None else argv)
    return args


def clean_command(argv: list[str]) -> str:
    """The command that made the rows, without ``--data-dir <dir>`` (a machine's own path; the data is found as the
    module docstring says)."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--data-dir":
            skip = True
        elif not word.startswith("--data-dir="):
            words.append(word)
    return "python bench/lattice_objectives.py " + shlex.join(words)


def run_config(args, method: str, seed: int) -> RankingRunConfig:
    params = dict(MODEL_PARAMS[args.model])
    if args.base_rates is not None:
        params["task_base_rates"] = list(args.base_rates)
    return RankingRunConfig(
        data=RankingDataConfig(dataset=args.dataset, data_dir=args.data_dir, split=args.split, n_eval=args.n_eval,
                               max_history=args.max_history, max_candidates=args.max_candidates),  # fmt: skip
        model=RankingModelConfig(name=args.model, params=params),
        train=RankingTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                                 select_metric="NE", seed=seed, num_threads=args.threads,
                                 max_steps_per_epoch=args.max_steps, task_weights=args.task_weights,
                                 task_balancing=method),  # fmt: skip
        output_dir=str(Path(args.runs) / args.dataset / f"{args.model}-{method}" / f"seed{seed}"),
    )


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def train_all(args, ds) -> dict[str, list[dict]]:
    """{method: [one entry per seed: results, predictions, the best epoch's log row, seconds]}."""
    runs: dict[str, list[dict]] = {}
    for method in args.methods:
        for seed in args.seeds:
            config = run_config(args, method, seed)
            out = Path(config.output_dir)
            resume = args.resume and (out / "checkpoint.pt").exists()
            start = time.perf_counter()
            results = train_ranker(config, dataset=ds, resume=resume, overwrite=not resume, progress=False)
            log = read_log(out)
            seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in log)
            runs.setdefault(method, []).append({
                "seed": seed, "results": results, "pred": load_predictions(out / "test_predictions.npz"),
                "best": log[results["best_epoch"] - 1], "seconds": seconds,
                "seconds_per_epoch": results["seconds_per_epoch"],
            })  # fmt: skip
            print(f"{method} seed {seed}: best epoch {results['best_epoch']} of {results['epochs_run']}, "
                  f"{seconds:.0f}s ({time.perf_counter() - start:.0f}s wall)", flush=True)  # fmt: skip
    return runs


def ci_entry(diffs: dict) -> dict:
    return {METRIC_NAMES[m]: {"diff": d.diff, "low": d.ci_low, "high": d.ci_high, "excludes_zero": d.excludes_zero}
            for m, d in diffs.items()}  # fmt: skip


def make_rows(args, ds, runs: dict[str, list[dict]]) -> list[dict]:
    tasks = ds.schema.tasks
    reference = runs["fixed"][0]["pred"]
    for method_runs in runs.values():  # every run scored the same test candidates, in the same order
        for run in method_runs:
            load_predictions(Path(run["results"]["config"]["output_dir"]) / "test_predictions.npz", like=reference)
    settings = {"model": args.model, "model_params": MODEL_PARAMS[args.model], "epochs_cap": args.epochs,
                "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr,
                "max_history": args.max_history, "max_candidates": args.max_candidates,
                "task_weights": args.task_weights, "init_base_rates": args.base_rates is not None,
                "pe_ltr_bound_mass": PE_LTR_BOUND_MASS, "threads": args.threads,
                "max_steps_per_epoch": args.max_steps}  # fmt: skip
    counts = ds.counts("test", args.max_candidates)
    rows = []
    for method, method_runs in runs.items():
        for k, task in enumerate(tasks):
            labels, users = reference.labels[:, k], reference.user_ids
            per_seed = [{"seed": r["seed"], "best_epoch": r["results"]["best_epoch"],
                         "epochs": r["results"]["epochs_run"],
                         **{METRIC_NAMES[m]: r["results"]["test"]["metrics"][task][m] for m in METRIC_NAMES}}
                        for r in method_runs]  # fmt: skip
            metrics = {name: _mean([s[name] for s in per_seed]) for name in METRIC_NAMES.values()}
            ci = None
            if method != "fixed":
                stack = np.stack([r["pred"].probs[:, k] for r in method_runs])  # [S, N]
                base = np.stack([r["pred"].probs[:, k] for r in runs["fixed"]])
                diffs = paired_bootstrap(stack, base, labels, users, num_resamples=args.resamples, seed=0)
                ci = {"baseline": "fixed", "confidence": 0.95, "num_resamples": args.resamples, **ci_entry(diffs)}
            balance = [r["best"].get("task_balance") or {} for r in method_runs]
            weights = _mean([b.get("weights", {}).get(task) for b in balance])
            log_var = _mean([b.get("log_variances", {}).get(task) for b in balance]) if method == "uncertainty" else None
            rows.append({
                "study": STUDY, "dataset": ds.name, "split": ds.split, "model": args.model, "variant": method,
                "task": task, "seeds": [r["seed"] for r in method_runs], "metrics": metrics, "per_seed": per_seed,
                "ci": ci, "weights": weights, "log_variances": log_var,
                "seconds": round(sum(r["seconds"] for r in method_runs), 1),
                "seconds_per_epoch": _mean([r["seconds_per_epoch"] for r in method_runs]),
                "smoke": args.max_steps > 0, "command": args.command, "protocol": PROTOCOL, "settings": settings,
                "test_candidates": counts["candidates"], "test_base_rate": counts["base_rates"][task],
            })  # fmt: skip
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def merge_rows(out: Path, rows: list[dict]) -> None:
    """Replace the rows with the same (dataset, model, variant, task) in ``out``, keep the others."""

    def key(r: dict) -> tuple:
        return (r["dataset"], r["model"], r["variant"], r["task"])

    old = json.loads(out.read_text()) if out.exists() else []
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    write_json(out, merged)
    print(f"wrote {len(rows)} rows to {out} ({len(merged)} in all)")


# ------------------------------------------------------------------------------------------------ tables
def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec).replace("-", "\u2212")


def _ci(row: dict, metric: str) -> str:
    c = (row.get("ci") or {}).get(metric)
    if not c:
        return "(reference)"
    verdict = ""
    if c["excludes_zero"]:
        better = c["diff"] > 0 if metric in ("AUC", "GAUC") else c["diff"] < 0
        verdict = " **helps**" if better else " **hurts**"
    return f"{_num(c['diff'], '+.4f')} [{_num(c['low'], '+.4f')}, {_num(c['high'], '+.4f')}]{verdict}"


def markdown_tables(path: str | Path = RESULTS) -> str:
    """The study's tables (one per dataset and model), from the rows in ``path``; smoke rows are left out."""
    path = Path(path)
    rows = [r for r in json.loads(path.read_text()) if r.get("study") == STUDY and not r.get("smoke")]
    if not rows:
        return f"No rows of the {STUDY!r} study in {path}.\n"
    parts = []
    for dataset, model in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        methods = list(dict.fromkeys(r["variant"] for r in group))
        tasks = list(dict.fromkeys(r["task"] for r in group))
        first = group[0]
        parts.append(f"#### {dataset}, {model}, seeds {first['seeds']}\n\n`{first['command']}`\n")
        lines = ["| task | method | AUC | NE | weight | AUC − fixed [95% CI] | NE − fixed [95% CI] |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for task in tasks:
            for method in methods:
                r = next(x for x in group if x["variant"] == method and x["task"] == task)
                m = r["metrics"]
                lines.append(f"| {task} | {method} | {_num(m['AUC'])} | {_num(m['NE'])} | {_num(r['weights'], '.3f')} "
                             f"| {_ci(r, 'AUC')} | {_ci(r, 'NE')} |")  # fmt: skip
        parts.append("\n".join(lines))
        summary = ["| method | tasks helped (AUC / NE) | tasks hurt (AUC / NE) | s per epoch |", "|---|---|---|---|"]
        for method in methods:
            if method == "fixed":
                continue
            mrows = [x for x in group if x["variant"] == method]
            helped, hurt = [], []
            for x in mrows:
                for metric in ("AUC", "NE"):
                    c = x["ci"][metric]
                    if c["excludes_zero"]:
                        better = c["diff"] > 0 if metric == "AUC" else c["diff"] < 0
                        (helped if better else hurt).append(f"{x['task']} ({metric})")
            summary.append(f"| {method} | {', '.join(helped) or 'none'} | {', '.join(hurt) or 'none'} | "
                           f"{_num(mrows[0]['seconds_per_epoch'], '.1f')} |")  # fmt: skip
        fixed = next(x for x in group if x["variant"] == "fixed")
        summary.append(f"| fixed | (reference) | (reference) | {_num(fixed['seconds_per_epoch'], '.1f')} |")
        parts.append("\n".join(summary))
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ plot
def plot(path: str | Path, out: str | Path) -> bool:
    """Draw the per-task trade-off of every (dataset, model) group in ``path`` into ``out``; False (with a message)
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {out} not drawn (pip install matplotlib, then --plot-only)")
        return False
    rows = [r for r in json.loads(Path(path).read_text()) if r.get("study") == STUDY and not r.get("smoke")]
    groups = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    if not groups:
        print(f"no rows of the {STUDY!r} study in {path}: nothing to plot")
        return False
    fig, axes = plt.subplots(len(groups), 3, figsize=(17, 4.4 * len(groups)), squeeze=False)
    for g, (dataset, model) in enumerate(groups):
        group = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        tasks = list(dict.fromkeys(r["task"] for r in group))
        methods = list(dict.fromkeys(r["variant"] for r in group))
        others = [m for m in methods if m != "fixed"]
        x = np.arange(len(tasks))
        for col, metric in enumerate(("AUC", "NE")):
            ax = axes[g, col]
            width = 0.8 / max(len(others), 1)
            for i, method in enumerate(others):
                cis = [next(r for r in group if r["variant"] == method and r["task"] == t)["ci"][metric] for t in tasks]
                diff = np.array([c["diff"] for c in cis])
                err = np.array([[c["diff"] - c["low"] for c in cis], [c["high"] - c["diff"] for c in cis]])
                ax.bar(x + (i - (len(others) - 1) / 2) * width, diff, width, yerr=err, capsize=2, label=method)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(x, tasks, rotation=30)
            better = "higher is better" if metric == "AUC" else "lower is better"
            ax.set_title(f"test {metric} − fixed, 95% CI ({better})", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{dataset}\n{model}", fontsize=9)
            ax.legend(fontsize=8)
        ax = axes[g, 2]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            w = [next(r for r in group if r["variant"] == method and r["task"] == t)["weights"] or 0.0 for t in tasks]
            w = np.array(w) / max(sum(w), 1e-12)  # share of the total weight, comparable across methods
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, w, width, label=method)
        ax.set_xticks(x, tasks, rotation=30)
        ax.set_title("share of the loss weight per task (best epoch, mean)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_tables(args.out))
        return 0
    if args.plot_only:
        plot(args.out, args.plot)
        return 0
    logging.basicConfig(level=logging.WARNING)
    ds = load_ranking_dataset(args.dataset, data_dir=args.data_dir, split=args.split, n_eval=args.n_eval,
                              max_candidates=args.max_candidates)  # fmt: skip
    print(ds.describe(args.max_candidates), flush=True)
    args.dataset, args.split = ds.name, ds.split
    args.base_rates = None
    if not args.no_init_base_rates:
        rates = ds.counts("train", args.max_candidates)["base_rates"]
        args.base_rates = tuple(min(max(float(rates[t]), 1e-4), 1 - 1e-4) for t in ds.schema.tasks)
    runs = train_all(args, ds)
    rows = make_rows(args, ds, runs)
    merge_rows(Path(args.out), rows)
    print(markdown_tables(args.out))
    if not args.max_steps:
        plot(args.out, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
