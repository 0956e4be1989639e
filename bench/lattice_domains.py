"""Multi-domain consolidation: one HSTU ranker per domain against one consolidated ranker with domain-specific parts.

Domains are the dataset's domain definitions (``genrec.data.ranking.DOMAIN_DEFINITIONS``: ML-1M ``age``, the user's
age group, and ``genre``, the candidate movie's genre group; Taobao ``top-categories``). Options, all the same HSTU
ranker (``genrec.models.hstu_ranker``) trained by ``genrec.train.ranking.train_ranker`` on the same rows:

    per-domain  (a) one model per domain, each trained and validated on its domain's candidates only
                    (``data.only_domain``; same rows, histories and features as the consolidated models see)
    shared          one consolidated model that is not told the domain (a reference for what the domain parts add)
    token       (b) consolidated, a learned per-domain vector added to each candidate's token (``domain_token``)
    towers      (c) consolidated, one head tower per domain (``domain_towers``, parameter untying of the head)
    ffn         (d) consolidated, per-domain output projection of the candidate tokens in every HSTU layer
                    (``domain_ffn``, HSTU's equivalent of per-domain FFN weights)

Every model: the epoch is chosen on the validation part (mean NE over the tasks), the test part is scored once.
Per domain (and over all candidates), per task: AUC and NE of every option (seed means), and the paired user
bootstrap (``genrec.eval.ranking_metrics.paired_bootstrap``, seeds averaged inside each resample) of each option
minus the per-domain models, and of token / towers / ffn minus shared. The per-domain models' test predictions are
put together into one prediction per test candidate, so every comparison pairs the same candidates. Parameters:
the sum over the per-domain models for (a), the one model's otherwise. Training cost: seconds of the training
passes (and, separately, the validation passes) of every epoch run, summed over the per-domain models; epochs run.

    python bench/lattice_domains.py --definition age      # ML-1M age groups, 1,500 users, 2 seeds (about 12 min)
    python bench/lattice_domains.py --definition genre    # ML-1M genre groups (about 17 min: more rows, see the docs)
    python bench/lattice_domains.py --definition age --max-users 0 --epochs 3 --embedding-dim 64 --setting all-d64
    python bench/lattice_domains.py --dataset taobao --definition top-categories --max-users 0
    python bench/lattice_domains.py --markdown            # the tables of results/lattice_domains.json

Rows of ``results/lattice_domains.json`` (rows with the same dataset, definition, setting, option, domain and
task are replaced, others kept)::

    {"study": "domains", "dataset", "definition", "setting" (--setting), "domain" (a domain name or "all"), "variant" (the option),
     "task", "metrics": {"AUC", "NE"} (seed means), "per_seed": {"AUC": [...], "NE": [...]},
     "ci": {"reference": "per-domain", "confidence", "num_resamples", "AUC" | "NE": {"diff", "low", "high",
            "excludes_zero", "seeds_agree"}} or null for the per-domain rows,
     "ci_vs_shared": the same against the shared model (token / towers / ffn rows) or null,
     "parameters", "train_rows_per_epoch" (training rows of one epoch; per-domain: summed over its models: each
     row is one history pass, the main training cost), "train_seconds" and "eval_seconds" (per seed: [...]), "epochs" (per seed: [...], for per-domain
     the per-domain models' epochs), "test_candidates", "test_users", "seeds", "command", "protocol", "settings"}
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.config import (
    RankingDataConfig,
    RankingModelConfig,
    RankingRunConfig,
    RankingTrainConfig,
)
from genrec.data.ranking import load_ranking_dataset
from genrec.eval.ranking_metrics import auc, normalized_entropy, paired_bootstrap
from genrec.io import write_json
from genrec.train.ranking import build_ranker, load_predictions, train_ranker

RESULTS = ROOT / "results" / "lattice_domains.json"
RUNS = ROOT / "runs" / "lattice" / "domains"
STUDY = "domains"
OPTIONS = ("per-domain", "shared", "token", "towers", "ffn")
FLAGS = {"per-domain": {}, "shared": {}, "token": {"domain_token": True}, "towers": {"domain_towers": True},
         "ffn": {"domain_ffn": True}}  # fmt: skip
CANONICAL = {"taobao": "taobao-userbehavior-head", "kuairand": "kuairand-27k-like-hate-subset"}
METRICS = {"auc": "AUC", "ne": "NE"}
DEFAULT_SETTING = "small"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--definition", default="age", help="the dataset's domain definition (ml-1m: age, genre)")
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-users", type=int, default=1500, help="a random sample of this many users (0 = all)")
    ap.add_argument("--user-sample-seed", type=int, default=0)
    ap.add_argument("--max-history", type=int, default=50)
    ap.add_argument("--max-candidates", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--embedding-dim", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=2)
    ap.add_argument("--attention-dim", type=int, default=16)
    ap.add_argument("--linear-dim", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--resume", action="store_true", help="reuse finished runs with the same configuration")
    ap.add_argument("--runs", type=Path, default=RUNS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--setting", default=DEFAULT_SETTING,
                    help="a name for these settings: rows of other settings are kept next to them (e.g. 4-epochs)")
    ap.add_argument("--markdown", action="store_true", help="print the tables of --out and exit")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ training


def run_config(args, option: str, seed: int, domain: str | None) -> RankingRunConfig:
    params = {"variant": "summed", "embedding_dim": args.embedding_dim, "num_blocks": args.num_blocks,
              "num_heads": args.num_heads, "attention_dim": args.attention_dim, "linear_dim": args.linear_dim,
              **FLAGS[option]}  # fmt: skip
    out = args.runs / args.dataset / args.definition / args.setting / option / f"seed{seed}"
    return RankingRunConfig(
        data=RankingDataConfig(dataset=args.dataset, data_dir=args.data_dir, split=None, max_history=args.max_history,
                               max_candidates=args.max_candidates, domains=args.definition,
                               only_domain=domain),
        model=RankingModelConfig(name="hstu-ranker", params=params),
        train=RankingTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                                 select_metric="NE", seed=seed, num_threads=args.threads),
        output_dir=str(out if domain is None else out / domain),
    )


def train(args, config: RankingRunConfig, dataset) -> dict:
    """Train (or, with --resume, reuse a finished run of the same model, training and data settings and the same
    test rows); the run's summary."""
    out = Path(config.output_dir)
    done = out / "results.json"
    results = None
    if args.resume and done.is_file():
        stored = json.loads(done.read_text())
        mine = config.to_dict()
        data_keys = ("dataset", "domains", "only_domain", "max_history", "max_candidates", "n_eval")
        test = dataset.counts("test", config.data.max_candidates)
        same_rows = all(stored["test"]["protocol"][k] == test[k] for k in ("rows", "candidates", "users"))
        if same_rows and all(stored["config"].get(k) == mine[k] for k in ("model", "train")) \
                and all(stored["config"]["data"][k] == mine["data"][k] for k in data_keys):  # fmt: skip
            results = stored
    if results is None:
        results = train_ranker(config, dataset=dataset, overwrite=True, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    torch.manual_seed(0)
    model = build_ranker(config.model, dataset.schema, max_history=config.data.max_history)
    return {
        "predictions": load_predictions(out / "test_predictions.npz"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": sum(e["train_seconds"] for e in log),
        "eval_seconds": sum(e["eval_seconds"] for e in log),
        "epochs": len(log),
        "best_epoch": results["best_epoch"],
    }


def test_order(dataset, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(event index, domain id, user id) of every test candidate in the order ``predict`` writes them."""
    rows = dataset.rows("test", C)
    return rows.cands, dataset.ev_domain[rows.cands], dataset.ev_user[rows.cands]


def check_aligned(pred, dataset, cands: np.ndarray) -> None:
    """The predictions are of exactly these candidates (items and times), in this order."""
    if not (np.array_equal(pred.item_ids, dataset.ev_item[cands])
            and np.array_equal(pred.cand_times, dataset.ev_time[cands])):  # fmt: skip
        raise RuntimeError("test predictions are not in the test rows' candidate order")


def run_option(args, option: str, seed: int, dataset) -> dict:
    """Train ``option`` for ``seed``; its test probabilities [N, T] in the full test order, parameters, cost."""
    C = args.max_candidates
    cands, dom, _ = test_order(dataset, C)
    if option != "per-domain":
        r = train(args, run_config(args, option, seed, None), dataset)
        check_aligned(r["predictions"], dataset, cands)
        return {**r, "probs": r["predictions"].probs, "labels": r["predictions"].labels,
                "epochs": [r["epochs"]], "best_epoch": [r["best_epoch"]],
                "train_rows": dataset.counts("train", C)["rows"]}  # fmt: skip
    probs = np.full((len(cands), dataset.schema.num_tasks), np.nan, dtype=np.float32)
    labels = np.full_like(probs, np.nan)
    total = {"parameters": 0, "train_seconds": 0.0, "eval_seconds": 0.0, "epochs": [], "best_epoch": [],
             "train_rows": 0}
    for k, name in enumerate(dataset.schema.domains, 1):
        part = dataset.restrict_to_domain(name)
        r = train(args, run_config(args, option, seed, name), part)
        where = dom == k
        check_aligned(r["predictions"], dataset, cands[where])
        probs[where], labels[where] = r["predictions"].probs, r["predictions"].labels
        for key in ("parameters", "train_seconds", "eval_seconds"):
            total[key] += r[key]
        total["train_rows"] += part.counts("train", C)["rows"]
        total["epochs"].append(r["epochs"])
        total["best_epoch"].append(r["best_epoch"])
    if np.isnan(probs).any():
        raise RuntimeError("a test candidate has no per-domain prediction (a candidate of an unknown domain?)")
    return {**total, "probs": probs, "labels": labels}


# ------------------------------------------------------------------------------------------------ comparison


def ci_entry(diffs: dict) -> dict:
    return {METRICS[m]: {"diff": d.diff, "low": d.ci_low, "high": d.ci_high, "excludes_zero": d.excludes_zero,
                         "seeds_agree": d.seeds_agree} for m, d in diffs.items()}  # fmt: skip


def compare(args, dataset, runs: dict[str, list[dict]], command: str, protocol: str, settings: dict) -> list[dict]:
    cands, dom, users = test_order(dataset, args.max_candidates)
    labels = runs[args.options[0]][0]["labels"]
    for option_runs in runs.values():
        for r in option_runs:
            if not np.array_equal(r["labels"], labels):
                raise RuntimeError("options were scored on different test labels")
    groups = [("all", np.ones(len(cands), dtype=bool))]
    groups += [(name, dom == k) for k, name in enumerate(dataset.schema.domains, 1)]
    rows = []
    for t, task in enumerate(dataset.schema.tasks):
        for domain, mask in groups:
            y = labels[mask, t]
            for option in args.options:
                probs = np.stack([r["probs"][mask, t] for r in runs[option]])  # [S, N_domain]
                entry = {"ci": None, "ci_vs_shared": None}
                for key, base in (("ci", "per-domain"), ("ci_vs_shared", "shared")):
                    if option in (base, "per-domain") or base not in runs:
                        continue
                    base_probs = np.stack([r["probs"][mask, t] for r in runs[base]])
                    diffs = paired_bootstrap(probs, base_probs, y, users[mask], num_resamples=args.resamples, seed=0,
                                             metrics=tuple(METRICS))  # fmt: skip
                    entry[key] = {"reference": base, "confidence": 0.95, "num_resamples": args.resamples,
                                  **ci_entry(diffs)}  # fmt: skip
                per_seed = {"AUC": [auc(p, y) for p in probs], "NE": [normalized_entropy(p, y) for p in probs]}
                rs = runs[option]
                rows.append({
                    "study": STUDY, "dataset": dataset.name, "definition": args.definition, "setting": args.setting,
                    "domain": domain,
                    "variant": option, "task": task,
                    "metrics": {k: float(np.mean(v)) for k, v in per_seed.items()}, "per_seed": per_seed,
                    **entry,
                    "parameters": rs[0]["parameters"], "train_rows_per_epoch": rs[0]["train_rows"],
                    "train_seconds": [r["train_seconds"] for r in rs],
                    "eval_seconds": [r["eval_seconds"] for r in rs],
                    "epochs": [r["epochs"] for r in rs], "best_epoch": [r["best_epoch"] for r in rs],
                    "test_candidates": int(mask.sum()), "test_users": len(np.unique(users[mask])),
                    "test_positives": int(y.sum()),
                    "seeds": list(args.seeds), "command": command, "protocol": protocol, "settings": settings,
                })  # fmt: skip
    return rows


def merge(path: Path, new: list[dict]) -> list[dict]:
    def key(r: dict) -> tuple:
        return r["dataset"], r["definition"], _setting(r), r["variant"], r["domain"], r["task"]

    old = json.loads(path.read_text()) if path.is_file() else []
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


# ------------------------------------------------------------------------------------------------ tables


def _setting(row: dict) -> str:
    return row.get("setting", DEFAULT_SETTING)


def _cell(row: dict, metric: str, which: str = "ci") -> str:
    value = row["metrics"][metric]
    ci = row.get(which)
    if not ci:
        return f"{value:.4f}"
    c = ci[metric]
    mark = "**" if c["excludes_zero"] else ""
    return f"{value:.4f} ({mark}{c['diff']:+.4f}{mark} [{c['low']:+.4f}, {c['high']:+.4f}])"


def markdown_tables(path: Path = RESULTS) -> str:
    """One table per (dataset, definition, task, metric): options x domains, value (difference against the
    per-domain models [95% CI], bold when the CI excludes 0); then parameters and cost."""
    if not path.is_file():
        return f"(no results: {path.name} does not exist; run bench/lattice_domains.py)"
    rows = [r for r in json.loads(path.read_text()) if r.get("study") == STUDY]
    out = []
    sections = sorted(dict.fromkeys((r["dataset"], r["definition"], _setting(r)) for r in rows),
                      key=lambda k: (k[0], k[1], k[2] != DEFAULT_SETTING, k[2]))  # fmt: skip
    for ds, definition, setting in sections:
        mine = [r for r in rows if r["dataset"] == ds and r["definition"] == definition and _setting(r) == setting]
        options = [o for o in OPTIONS if any(r["variant"] == o for r in mine)]
        domains = list(dict.fromkeys(r["domain"] for r in mine))
        domains = [d for d in domains if d != "all"] + ["all"]
        first = mine[0]
        out.append(f"### {ds}, domains {definition!r}, setting {setting!r}\n\n{first['protocol']}\n\n"
                   f"Command: `{first['command']}`\n")
        counts = {d: next(r for r in mine if r["domain"] == d) for d in domains}
        out.append("Test candidates (users): " + ", ".join(
            f"{d} {counts[d]['test_candidates']:,} ({counts[d]['test_users']:,})" for d in domains) + "\n")
        for task in dict.fromkeys(r["task"] for r in mine):
            for metric in ("AUC", "NE"):
                better = "higher" if metric == "AUC" else "lower"
                out.append(f"**{task}, test {metric}** ({better} is better; in brackets: option − per-domain models, "
                           "paired user bootstrap, 95% CI; bold = CI excludes 0)\n")
                out.append("| option | " + " | ".join(domains) + " |")
                out.append("|---|" + "---|" * len(domains))
                for option in options:
                    cells = []
                    for d in domains:
                        row = next((r for r in mine if r["variant"] == option and r["domain"] == d
                                    and r["task"] == task), None)  # fmt: skip
                        cells.append("—" if row is None else _cell(row, metric))
                    out.append(f"| {option} | " + " | ".join(cells) + " |")
                out.append("")
        out.append("**Consolidated options against the shared model** (option − shared, 95% CI; bold = excludes 0)\n")
        out.append("| option | task | " + " | ".join(f"{d} AUC / NE" for d in domains) + " |")
        out.append("|---|---|" + "---|" * len(domains))
        for option in [o for o in options if o not in ("per-domain", "shared")]:
            for task in dict.fromkeys(r["task"] for r in mine):
                cells = []
                for d in domains:
                    row = next((r for r in mine if r["variant"] == option and r["domain"] == d and r["task"] == task),
                               None)  # fmt: skip
                    ci = row and row.get("ci_vs_shared")
                    if not ci:
                        cells.append("—")
                        continue
                    parts = []
                    for m in ("AUC", "NE"):
                        c = ci[m]
                        b = "**" if c["excludes_zero"] else ""
                        parts.append(f"{b}{c['diff']:+.4f}{b} [{c['low']:+.4f}, {c['high']:+.4f}]")
                    cells.append(" / ".join(parts))
                out.append(f"| {option} | {task} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("**Cost** (per seed; per-domain = the sum over its models)\n")
        out.append("| option | parameters | training rows per epoch | training seconds | validation seconds | "
                   "epochs run (best) |")
        out.append("|---|---|---|---|---|---|")
        for option in options:
            r = next(r for r in mine if r["variant"] == option)
            secs = ", ".join(f"{s:.0f}" for s in r["train_seconds"])
            evs = ", ".join(f"{s:.0f}" for s in r["eval_seconds"])
            ep = "; ".join(f"{e} ({b})" for e, b in zip(r["epochs"], r["best_epoch"]))
            rows_ = r.get("train_rows_per_epoch")
            out.append(f"| {option} | {r['parameters']:,} | {'—' if rows_ is None else f'{rows_:,}'} | {secs} | {evs} "
                       f"| {ep} |")
        out.append("")
        out.append(winners(mine, domains))
    return "\n".join(out)


def winners(rows: list[dict], domains: list[str]) -> str:
    """Per domain and task: the option with the best seed-mean AUC and NE, and whether its difference against the
    per-domain models excludes 0."""
    lines = ["**Best option per domain** (best seed-mean value; 'significant' = its CI against per-domain excludes 0)",
             ""]  # fmt: skip
    for task in dict.fromkeys(r["task"] for r in rows):
        for d in domains:
            got = [r for r in rows if r["domain"] == d and r["task"] == task]
            parts = []
            for metric, sign in (("AUC", 1), ("NE", -1)):
                best = max(got, key=lambda r: sign * r["metrics"][metric])
                ci = best.get("ci")
                sig = "" if not ci else (" (significant vs per-domain)" if ci[metric]["excludes_zero"]
                                         else " (not significant vs per-domain)")  # fmt: skip
                parts.append(f"{metric} {best['variant']}{sig}")
            lines.append(f"- {task}, {d}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_tables(args.out))
        return 0
    if "per-domain" not in args.options:
        raise SystemExit("--options must include per-domain (every comparison is against it)")
    command = "python bench/lattice_domains.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dataset = load_ranking_dataset(CANONICAL.get(args.dataset, args.dataset), data_dir=args.data_dir,
                                   domains=args.definition, max_users=args.max_users or None,
                                   user_sample_seed=args.user_sample_seed,
                                   max_candidates=args.max_candidates)  # fmt: skip
    print(dataset.describe(args.max_candidates), flush=True)
    runs: dict[str, list[dict]] = {}
    for option in args.options:
        runs[option] = []
        for seed in args.seeds:
            t = time.perf_counter()
            r = run_option(args, option, seed, dataset)
            runs[option].append(r)
            print(f"{option} seed {seed}: {r['parameters']:,} parameters, {r['train_seconds']:.0f} s training, "
                  f"epochs {r['epochs']} ({time.perf_counter() - t:.0f} s wall)", flush=True)  # fmt: skip
    users = f"a random sample of {args.max_users:,} users (seed {args.user_sample_seed})" if args.max_users \
        else "all users"  # fmt: skip
    protocol = (
        f"{dataset.name} ({users}), split {dataset.split!r}"
        + (" (per user: last 10 ratings test, 10 before validation)" if dataset.split == "user-last" else "")
        + f"; domains {args.definition!r} {list(dataset.schema.domains)}. HSTU ranker (summed, d={args.embedding_dim},"
        f" {args.num_blocks} blocks, {args.num_heads} heads, max_history {args.max_history}, "
        f"{args.max_candidates} candidates per row), AdamW lr {args.lr}, batch {args.batch_size}, at most "
        f"{args.epochs} epochs (patience {args.patience}), epoch chosen by validation NE (mean over tasks), test "
        f"scored once; seeds {args.seeds}; {args.threads} thread(s). per-domain = one model per domain trained on "
        "its domain's candidates (same rows and histories); shared = one model without domain input; token / "
        "towers / ffn = one model with a per-domain candidate vector / head tower / layer output projection. "
        "Metrics on the test candidates of each domain ('all' = every test candidate, the per-domain models' "
        f"predictions pooled); CIs: paired user bootstrap, {args.resamples} resamples, seed means."
    )
    settings = {k: getattr(args, k.replace("-", "_")) for k in (
        "max_users", "user_sample_seed", "max_history", "max_candidates", "epochs", "patience", "batch_size", "lr",
        "embedding_dim", "num_blocks", "num_heads", "attention_dim", "linear_dim", "threads", "resamples")}
    rows = compare(args, dataset, runs, command, protocol, settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, merge(args.out, rows))
    print(markdown_tables(args.out))
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
