"""Retrieval quality on ML-1M and Amazon Beauty: baselines, SASRec, HSTU, HSTU-large (a benchmark, not a test).

Every row is one model on one dataset, evaluated under a named protocol (leave-one-out, full catalogue, items of the
history excluded). Neural models are selected on the validation item (early stopping); their test row is measured
once, at the chosen epoch. Rows go to ``results/quality.json`` and the table in ``docs/reproducing-hstu.md`` is
regenerated from it.

    python bench/quality.py run --dataset ml-1m --model hstu --threads 2   # one row pair (valid + test)
    python bench/quality.py refit --dataset ml-1m --name hstu               # refit on train+valid, test once
    python bench/quality.py seeds --dataset ml-1m --names A B C --row "hstu (3 seeds)"   # mean ± sd row
    python bench/quality.py baselines                                      # popularity + transition chain
    python bench/quality.py baselines --ties-seed 0                        # the same, same-timestamp ties shuffled
    python bench/quality.py compare --dataset ml-1m --a A1 A2 --b B1 B2      # paired bootstrap of A - B (test)
    python bench/quality.py table                                          # rewrite the docs table
    python bench/quality.py levers                                         # the lever study's comparisons + table
    python bench/quality.py all                                            # everything, sequentially (hours)

Run directories go under ``runs/quality/<dataset>/<name>``; the data is found through --data-dir, else
``$GENREC_DATA_DIR``, else the cache directory (``genrec data fetch ml-1m``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from readme_table import write_between_markers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "quality.json"
DOC = ROOT / "docs" / "reproducing-hstu.md"
DATASETS = {"ml-1m": "ml-1m", "amazon-beauty": "amazon-beauty"}
MODELS = ("sasrec", "hstu", "hstu-large", "fuxi-alpha")  # configs/<dataset>/<model>.yaml where it exists
COMPARE = ROOT / "results" / "quality_compare.json"

# Published numbers under the same kind of protocol (full catalogue, history items excluded, leave-one-out).
# ML-1M: generative-recommenders README (= paper Table 4), last item as target, no validation split.
# Beauty: eSASRec paper (Tikhonovich et al., RecSys 2025) on the same S3-Rec Beauty file, max length 50.
PUBLISHED = [
    {"dataset": "ml-1m", "model": "SASRec (published)", "source": "HSTU paper / reference README",
     "metrics": {"HR@10": 0.2853, "NDCG@10": 0.1603, "HR@50": 0.5474, "NDCG@50": 0.2185, "HR@200": 0.7528, "NDCG@200": 0.2498}},
    {"dataset": "ml-1m", "model": "HSTU (published)", "source": "HSTU paper / reference README",
     "metrics": {"HR@10": 0.3097, "NDCG@10": 0.1720, "HR@50": 0.5754, "NDCG@50": 0.2307, "HR@200": 0.7716, "NDCG@200": 0.2606}},
    {"dataset": "ml-1m", "model": "HSTU-large (published)", "source": "HSTU paper / reference README",
     "metrics": {"HR@10": 0.3294, "NDCG@10": 0.1893, "HR@50": 0.5935, "NDCG@50": 0.2481, "HR@200": 0.7839, "NDCG@200": 0.2771}},
    {"dataset": "amazon-beauty", "model": "SASRec, 256 negatives (published)", "source": "eSASRec paper",
     "metrics": {"HR@10": 0.0921, "NDCG@10": 0.0531}},
    {"dataset": "amazon-beauty", "model": "eSASRec (published)", "source": "eSASRec paper",
     "metrics": {"HR@10": 0.0928, "NDCG@10": 0.0523}},
]  # fmt: skip

log = logging.getLogger("bench.quality")


def _load_rows() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def _save_rows(new_rows: list[dict]) -> None:
    """Replace rows with the same (dataset, model, split) and keep the others (under a lock: runs go in parallel)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_rows(new_rows)


def _merge_rows(new_rows: list[dict]) -> None:
    key = lambda r: (r["dataset"], r["model"], r["split"])  # noqa: E731
    rows = {key(r): r for r in _load_rows()}
    for r in new_rows:
        rows[key(r)] = r
    order = {d: i for i, d in enumerate(DATASETS)}
    model_order = {m: i for i, m in enumerate(("popularity", "transition-chain") + MODELS)}
    out = sorted(rows.values(), key=lambda r: (order.get(r["dataset"], 9), model_order.get(r["model"], 9), r["split"]))
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(RESULTS)


def run_model(
    dataset: str, model: str, data_dir: str, threads: int, extra: list[str], resume: bool = False, name: str | None = None
) -> list[dict]:
    import torch

    from genrec.config import load_config
    from genrec.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    config_path = ROOT / "configs" / dataset / f"{model}.yaml"
    name = name or model
    overrides = [*([f"data.data_dir={data_dir}"] if data_dir else []), f"output_dir={ROOT / 'runs' / 'quality' / dataset / name}",
                 *extra]
    cfg = load_config(config_path, overrides)
    res = train(cfg, resume=resume, overwrite=not resume, progress=False)
    common = {
        "dataset": dataset,
        "model": name,
        "config": str(config_path.relative_to(ROOT)),
        "selection": res["selection"],
        "overrides": extra,
        "epoch": res["best_epoch"],
        "epochs_run": res["epochs_run"],
        "seconds_per_epoch": res["seconds_per_epoch"],
        "seconds_to_best": seconds_to_best(Path(cfg.output_dir), res["best_epoch"]),
        "threads": threads or torch.get_num_threads(),
        "negatives": f"{cfg.train.negatives}-{cfg.train.num_negatives}",
        "notes": res["data"]["notes"],
    }
    return [
        {**common, "split": "valid", "protocol": res["valid"]["protocol"], "metrics": res["valid"]["metrics"]},
        {**common, "split": "test", "protocol": res["test"]["protocol"], "metrics": res["test"]["metrics"]},
    ]


def seconds_to_best(run_dir: Path, best_epoch: int) -> float | None:
    """Training plus validation seconds of epochs 1..best_epoch, from the run's ``log.jsonl`` (a resumed run's log
    holds every epoch); None when the log does not cover them."""
    log_path = run_dir / "log.jsonl"
    if not log_path.exists():
        return None
    epochs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    kept = [e for e in epochs if e["epoch"] <= best_epoch]
    if len(kept) != best_epoch:
        return None
    return float(sum(e["train_seconds"] + e.get("eval_seconds", 0.0) for e in kept))


def refit_model(dataset: str, data_dir: str, threads: int, extra: list[str], name: str) -> list[dict]:
    """Refit the finished run ``runs/quality/<dataset>/<name>`` with its own resolved config on train + validation,
    for its best-validation epoch count (``eval.selection=refit``), and test the result once: one test row named
    "<name> (refit on train+valid)"."""
    import torch

    from genrec.config import load_config
    from genrec.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    run_dir = ROOT / "runs" / "quality" / dataset / name
    epochs = int(json.loads((run_dir / "results.json").read_text())["best_epoch"])
    row_name = f"{name} (refit on train+valid)"
    cfg = load_config(run_dir / "config.yaml", [
        *([f"data.data_dir={data_dir}"] if data_dir else []), f"output_dir={ROOT / 'runs' / 'quality' / dataset / row_name}",
        "eval.selection=refit", f"train.epochs={epochs}", f"train.patience={epochs + 1}", "train.time_budget_minutes=0",
        *extra,
    ])  # fmt: skip
    res = train(cfg, overwrite=True, progress=False)
    return [{
        "dataset": dataset, "model": row_name, "config": str((run_dir / "config.yaml").relative_to(ROOT)),
        "selection": "refit", "overrides": extra, "epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
        "seconds_per_epoch": res["seconds_per_epoch"], "threads": threads or torch.get_num_threads(),
        "negatives": f"{cfg.train.negatives}-{cfg.train.num_negatives}", "split": "test",
        "notes": res["data"]["notes"] + [f"refit on s[:-1] for {epochs} epochs, the best-validation epoch of {name!r}"],
        "protocol": res["test"]["protocol"], "metrics": res["test"]["metrics"],
    }]  # fmt: skip


def finalize_run(dataset: str, run_dir: Path, name: str, data_dir: str, threads: int) -> list[dict]:
    """Rows for a run whose training was stopped by hand (no results.json): the best-validation checkpoint is
    evaluated once on test, and the rows say where training stopped."""
    import torch

    from genrec.api import Recommender

    if threads:
        torch.set_num_threads(threads)
    log_rows = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    best = json.loads((run_dir / "best.json").read_text())
    rec = Recommender.load(run_dir, data_dir=data_dir)
    protocol, metrics = rec.evaluate(target="test")
    common = {
        "dataset": dataset, "model": name, "config": str((run_dir / "config.yaml").relative_to(ROOT)), "overrides": [],
        "selection": "valid", "epoch": best["epoch"], "epochs_run": len(log_rows),
        "seconds_per_epoch": float(np.median([r["train_seconds"] for r in log_rows])), "threads": threads,
        "negatives": f"{rec.config_.train.negatives}-{rec.config_.train.num_negatives}",
        "notes": [f"training stopped by hand after epoch {len(log_rows)} (not by early stopping)"],
    }  # fmt: skip
    return [
        {**common, "split": "valid", "protocol": best["protocol"], "metrics": best["metrics"]},
        {**common, "split": "test", "protocol": protocol.to_dict(), "metrics": metrics},
    ]


def run_baselines(dataset: str, data_dir: str, max_len: int, ties_seed: int | None = None) -> list[dict]:
    """Popularity and the transition chain; with ``ties_seed`` the interactions of one timestamp are shuffled
    (``data.ties=shuffle``) and the rows are named "<model> (ties shuffled, seed k)"."""
    from genrec.config import DataConfig
    from genrec.data.dataset import prepare_data
    from genrec.data.sequences import leave_one_out
    from genrec.eval.evaluate import baseline_score_fn, evaluate
    from genrec.eval.protocol import EvalProtocol
    from genrec.models.baselines import PopularityRecommender, TransitionChainRecommender

    ties = {} if ties_seed is None else {"ties": "shuffle", "ties_seed": ties_seed}
    suffix = "" if ties_seed is None else f" (ties shuffled, seed {ties_seed})"
    seqs = prepare_data(DataConfig(dataset=dataset, data_dir=data_dir, max_len=max_len, **ties)).sequences
    train_split = leave_one_out(seqs, "train")
    train_seqs = [seqs.items[s:e] for s, e in zip(train_split.starts, train_split.ends)]
    rows = []
    for rec in (PopularityRecommender(), TransitionChainRecommender()):
        t0 = time.perf_counter()
        rec.fit(train_seqs, seqs.num_items)
        fit_seconds = time.perf_counter() - t0
        for split in ("valid", "test"):
            protocol = EvalProtocol(target=split, max_history=max_len)
            metrics = evaluate(baseline_score_fn(rec), seqs, protocol)
            rows.append({"dataset": dataset, "model": rec.name + suffix, "split": split, "protocol": protocol.to_dict(),
                         "epoch": None, "seconds_per_epoch": fit_seconds, "metrics": metrics})  # fmt: skip
            log.info("%s %s %s %s", dataset, rec.name, split, {k: round(v, 4) for k, v in metrics.items()})
    return rows


def seed_summary(dataset: str, names: list[str], row_name: str) -> list[dict]:
    """One test row averaging the finished test rows ``names`` (the same config trained with different seeds):
    ``metrics`` holds the means, ``metrics_sd`` the sample standard deviations, ``members`` the averaged rows."""

    rows = {r["model"]: r for r in _load_rows() if r["dataset"] == dataset and r["split"] == "test"}
    missing = [n for n in names if n not in rows]
    if missing:
        raise SystemExit(f"no test row for {missing} on {dataset}: run them first (bench/quality.py run --name ...)")
    if len(names) < 2:
        raise SystemExit("a seed summary needs at least two runs")
    members = [rows[n] for n in names]
    protocols = {m["protocol"]["name"] for m in members}
    if len(protocols) != 1:
        raise SystemExit(f"the runs were evaluated under different protocols: {sorted(protocols)}")
    keys = [k for k in members[0]["metrics"] if all(k in m["metrics"] for m in members)]
    values = {k: np.array([m["metrics"][k] for m in members], dtype=float) for k in keys}
    return [{
        "dataset": dataset, "model": row_name, "split": "test", "protocol": members[0]["protocol"],
        "selection": members[0].get("selection", "valid"), "members": names,
        "epoch": "/".join(str(m["epoch"]) for m in members),
        "seconds_per_epoch": float(np.median([m["seconds_per_epoch"] for m in members])),
        "seconds_to_best": [m.get("seconds_to_best") for m in members],
        "metrics": {k: float(v.mean()) for k, v in values.items()},
        "metrics_sd": {k: float(v.std(ddof=1)) for k, v in values.items()},
        "notes": [f"mean and sample sd over {len(names)} runs that differ only in train.seed"],
        **({"data_copy": members[0]["data_copy"]} if len({m.get("data_copy") for m in members}) == 1
           and members[0].get("data_copy") else {}),
    }]  # fmt: skip


def test_ranks(dataset: str, name: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(users [U], ranks [U], protocol) of run ``name``'s best checkpoint on the test item, user by user.

    Computed once from ``runs/quality/<dataset>/<name>`` (its best-validation weights and resolved config) and kept
    there as ``test_ranks.npz``. The metrics recomputed from the ranks must equal the run's stored test metrics:
    a different checkpoint or different data stops the comparison instead of comparing the wrong thing."""
    from genrec.api import Recommender
    from genrec.data.dataset import prepare_data
    from genrec.eval.evaluate import UserRanks, evaluate_ranks, metrics_from_user_ranks, model_score_fn
    from genrec.eval.protocol import EvalProtocol, protocol_from_config

    run_dir = ROOT / "runs" / "quality" / dataset / name
    stored = json.loads((run_dir / "results.json").read_text())["test"]
    cache = run_dir / "test_ranks.npz"  # written by training; computed here for runs trained without it
    if cache.exists():
        result = UserRanks.load(cache)
    else:
        rec = Recommender.load(run_dir, **({"data_dir": data_dir} if data_dir else {}))
        data = prepare_data(rec.config_.data)
        result = evaluate_ranks(model_score_fn(rec.model_, rec.config_.data.max_len), data.sequences,
                                protocol_from_config(rec.config_, "test"), rec.config_.train.eval_batch_size)  # fmt: skip
        result.save(cache)
    again = metrics_from_user_ranks(result, EvalProtocol.from_dict(stored["protocol"]))
    off = {k: (v, stored["metrics"].get(k)) for k, v in again.items() if abs(v - stored["metrics"].get(k, v + 1)) > 1e-9}
    if off:
        raise SystemExit(f"{run_dir}: the per-user test ranks do not give the test metrics of results.json: {off}")
    users, ranks = result.users, result.ranks
    return users, ranks, stored["protocol"]


def compare_runs(dataset: str, names_a: list[str], names_b: list[str], metrics: list[str], data_dir: str | None,
                 num_resamples: int = 1000) -> list[dict]:
    """Paired user-bootstrap differences A - B on the test item (seed means when several runs per side)."""
    from genrec.eval.metrics import paired_bootstrap_ranks

    sides = []
    for names in (names_a, names_b):
        got = [test_ranks(dataset, n, data_dir) for n in names]
        sides.append(got)
    users = sides[0][0][0]
    protocols = {p["name"] for side in sides for _, _, p in side}
    if len(protocols) != 1:
        raise SystemExit(f"the runs were evaluated under different protocols: {sorted(protocols)}")
    for side in sides:
        for u, _, _ in side:
            if not np.array_equal(u, users):
                raise SystemExit("the runs did not evaluate the same users (different data or protocol)")
    ranks_a = np.stack([r for _, r, _ in sides[0]])
    ranks_b = np.stack([r for _, r, _ in sides[1]])
    rows = []
    for metric in metrics:
        d = paired_bootstrap_ranks(ranks_a, ranks_b, metric, num_resamples=num_resamples)
        rows.append({
            "dataset": dataset, "a": names_a, "b": names_b, "metric": metric, "split": "test",
            "protocol": sides[0][0][2]["name"], "diff": d.diff, "ci": [d.ci_low, d.ci_high],
            "confidence": d.confidence, "excludes_zero": d.excludes_zero, "num_resamples": d.num_resamples,
            "num_users": d.num_users, "a_per_seed": d.a_per_seed, "b_per_seed": d.b_per_seed,
            "seeds_agree": d.seeds_agree,
            "method": "paired bootstrap over users (each user's value averaged over a side's runs), percentile interval",
        })  # fmt: skip
        log.info("%s %s: %s - %s = %+.4f [%+.4f, %+.4f]", dataset, metric, "+".join(names_a), "+".join(names_b),
                 d.diff, d.ci_low, d.ci_high)  # fmt: skip
    return rows


def _save_compare(new_rows: list[dict]) -> None:
    COMPARE.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = lambda r: (r["dataset"], tuple(r["a"]), tuple(r["b"]), r["metric"])  # noqa: E731
        rows = {key(r): r for r in (json.loads(COMPARE.read_text()) if COMPARE.exists() else [])}
        rows.update({key(r): r for r in new_rows})
        tmp = COMPARE.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
        tmp.replace(COMPARE)


# The lever study: each entry changes one thing of a base recipe and names the finished runs of both sides (one per
# seed, the same seeds). `python bench/quality.py levers` compares every entry whose runs are here (paired user
# bootstrap of the test item, seed means) and rewrites the lever table of docs/reproducing-hstu.md from
# results/quality_compare.json and results/quality.json; an entry whose base runs' per-user ranks are gone shows the
# difference of the seed means, marked unpaired, without an interval.
def _seeds(stem: str) -> list[str]:
    return [f"{stem}-seed42", f"{stem}-seed1"]


def _lever(dataset: str, lever: str, change: str, recipe: str, base: list[str], variant: list[str]) -> dict:
    return {"dataset": dataset, "lever": lever, "change": change, "recipe": recipe, "base": base, "variant": variant}


_ML, _BEAUTY = "ml-1m", "amazon-beauty"
_R40 = "HSTU, 40 cosine epochs (`configs/ml-1m/hstu-cosine.yaml`)"
_R60 = "HSTU, 60 cosine epochs (`configs/amazon-beauty/hstu-cosine.yaml`)"
_RHSTU = "HSTU, constant rate, patience 20 (`configs/ml-1m/hstu.yaml`)"
_FUXI = "encoder: FuXi-α (semantic / temporal / positional channels, SwiGLU FFN)"
LEVERS = [
    # ML-1M: HSTU, 40 epochs with a cosine schedule (configs/ml-1m/hstu-cosine.yaml), seeds 42 and 1
    _lever(_ML, "negatives: + 128 in-batch negatives (logQ-corrected)", "train.in_batch_negatives=128",
           _R40, _seeds("hstu-cos40"), _seeds("hstu-cos40-inbatch128")),
    _lever(_ML, _FUXI, "--model fuxi-alpha", _R40, _seeds("hstu-cos40"), _seeds("fuxi-alpha-cos40")),
    _lever(_ML, "length: constant rate to early stopping (patience 20) instead of 40 cosine epochs",
           "train.lr_schedule=constant train.epochs=200 train.patience=20", _R40, _seeds("hstu-cos40"),
           _seeds("hstu")),
    _lever(_ML, "size: HSTU-large (8 blocks, 2 heads) instead of HSTU (2 blocks)", "--model hstu-large",
           _RHSTU, _seeds("hstu"), _seeds("hstu-large")),
    _lever(_ML, "schedule: cosine to epoch 120 instead of a constant rate (HSTU-large)",
           "train.epochs=120 train.lr_schedule=cosine train.warmup_epochs=2 train.patience=120",
           "HSTU-large, constant rate, patience 20 (`configs/ml-1m/hstu-large.yaml`)", _seeds("hstu-large"),
           _seeds("hstu-large-cosine120")),
    _lever(_ML, "time: without the relative time bias (one seed)", "model.use_time_bias=false",
           _RHSTU, ["hstu-seed42"], ["hstu-no-time-bias-seed42"]),
    # Amazon Beauty: HSTU, 60 epochs with a cosine schedule (configs/amazon-beauty/hstu-cosine.yaml), seeds 42 and 1
    _lever(_BEAUTY, "negatives: + 256 in-batch negatives (logQ-corrected)", "train.in_batch_negatives=256",
           _R60, _seeds("hstu-cos60"), _seeds("hstu-cos60-inbatch256")),
    _lever(_BEAUTY, _FUXI, "--model fuxi-alpha", _R60, _seeds("hstu-cos60"), _seeds("fuxi-alpha-cos60")),
    _lever(_BEAUTY, "length: constant rate to early stopping (patience 20, 60 min budget) instead of 60 cosine epochs",
           "train.lr_schedule=constant train.epochs=200 train.patience=20", _R60, _seeds("hstu-cos60"),
           ["hstu-refinit-seed42", "hstu-seed1"]),
]
LEVER_START, LEVER_END = "<!-- lever-table:start -->", "<!-- lever-table:end -->"
LEVER_METRICS = ("HR@10", "NDCG@10")


def _have_ranks(dataset: str, name: str) -> bool:
    run_dir = ROOT / "runs" / "quality" / dataset / name
    return (run_dir / "results.json").exists() and (run_dir / "best.safetensors").exists()


def backfill_seconds_to_best() -> None:
    """Add ``seconds_to_best`` to the stored rows of runs that are here but were recorded without it."""
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = _load_rows()
        changed = []
        for r in rows:
            run_dir = ROOT / "runs" / "quality" / r["dataset"] / r["model"]
            if r.get("seconds_to_best") is None and isinstance(r.get("epoch"), int) and (run_dir / "log.jsonl").exists():
                r["seconds_to_best"] = seconds_to_best(run_dir, r["epoch"])
                changed.append(r)
        if changed:
            _merge_rows(changed)


def compare_levers(data_dir: str | None) -> list[dict]:
    """Paired comparisons (variant - base) of every lever whose runs are all on this machine."""
    rows = []
    for lev in LEVERS:
        names = lev["base"] + lev["variant"]
        if all(_have_ranks(lev["dataset"], n) for n in names):
            rows += compare_runs(lev["dataset"], lev["variant"], lev["base"], list(LEVER_METRICS), data_dir)
        else:
            log.info("%s / %s: runs missing here (%s); kept as stored", lev["dataset"], lev["lever"],
                     [n for n in names if not _have_ranks(lev["dataset"], n)])
    return rows


def _fmt_minutes(seconds: list) -> str:
    vals = [s for s in seconds if s is not None]
    return "–" if len(vals) != len(seconds) or not vals else "/".join(f"{s / 60:.0f}" for s in vals)


def render_levers(rows: list[dict], compares: list[dict]) -> str:
    """The lever table: per lever the base and variant seed means, the paired difference with its 95% interval
    (or the unpaired difference of means), a verdict on NDCG@10 and the minutes to the best epoch per seed."""
    test = {(r["dataset"], r["model"]): r for r in rows if r["split"] == "test"}
    paired = {(c["dataset"], tuple(c["a"]), tuple(c["b"]), c["metric"]): c for c in compares}
    lines = ["| dataset | lever (one change) | base recipe | base HR@10 / NDCG@10 | with the lever | "
             "Δ HR@10 [95% CI] | Δ NDCG@10 [95% CI] | verdict (NDCG@10) | minutes to best epoch, base → lever |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lev in LEVERS:
        ds = lev["dataset"]
        sides = [[test.get((ds, n)) for n in lev[k]] for k in ("base", "variant")]
        if any(r is None for side in sides for r in side):
            continue  # not run yet
        means = [{m: float(np.mean([r["metrics"][m] for r in side])) for m in LEVER_METRICS} for side in sides]
        cells, verdict = [], "unpaired: no interval"
        for m in LEVER_METRICS:
            c = paired.get((ds, tuple(lev["variant"]), tuple(lev["base"]), m))
            flipped = paired.get((ds, tuple(lev["base"]), tuple(lev["variant"]), m))
            if c is None and flipped is not None:  # stored as base - variant: the same comparison, negated
                c = {**flipped, "diff": -flipped["diff"], "ci": [-flipped["ci"][1], -flipped["ci"][0]]}
            if c is None:
                cells.append(f"{means[1][m] - means[0][m]:+.4f} (unpaired)")
                continue
            cells.append(f"{c['diff']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]")
            if m == "NDCG@10":
                verdict = "better" if c["ci"][0] > 0 else "worse" if c["ci"][1] < 0 else "tie (CI holds 0)"
                if not c.get("seeds_agree", True):
                    verdict += "; seeds disagree"
        minutes = [_fmt_minutes([r.get("seconds_to_best") for r in side]) for side in sides]
        seeds = f" ({len(lev['base'])} seed{'s' if len(lev['base']) > 1 else ''})"
        lines.append(
            f"| {ds} | {lev['lever']} (`{lev['change']}`) | {lev['recipe']}{seeds} | {means[0]['HR@10']:.4f} / {means[0]['NDCG@10']:.4f} | "
            f"{means[1]['HR@10']:.4f} / {means[1]['NDCG@10']:.4f} | {cells[0]} | {cells[1]} | {verdict} | "
            f"{minutes[0]} → {minutes[1]} |"
        )
    return "\n".join(lines)


def write_levers() -> None:
    compares = json.loads(COMPARE.read_text()) if COMPARE.exists() else []
    table = render_levers(_load_rows(), compares)
    write_between_markers(DOC, LEVER_START, LEVER_END, table)
    print(table)


MAX_LEN = {"ml-1m": 200, "amazon-beauty": 50}
TABLE_START, TABLE_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def render_table(rows: list[dict]) -> str:
    lines = []
    for dataset in DATASETS:
        test = [r for r in rows if r["dataset"] == dataset and r["split"] == "test"]
        if not test:
            continue
        proto = test[0]["protocol"]["name"]
        lines.append(f"**{dataset}** — test split, protocol `{proto}`; neural rows at the best-validation epoch\n")
        lines.append("| model | HR@10 | NDCG@10 | HR@50 | NDCG@50 | HR@200 | NDCG@200 | MRR | best epoch | s/epoch |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        summarised = {n for r in test for n in r.get("members", [])}  # seed runs show as their summary row
        for r in test:
            if r["model"] in summarised:
                continue
            m, sd = r["metrics"], r.get("metrics_sd", {})
            sec = "fit %.1f s" % r["seconds_per_epoch"] if r["epoch"] is None else "%.1f" % r["seconds_per_epoch"]
            cells = [(f"{m[k]:.4f}" + (f" ± {sd[k]:.4f}" if k in sd and k in ("HR@10", "NDCG@10") else "")) if k in m
                     else "–" for k in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200", "NDCG@200", "MRR")]
            label = r["model"] + (" †" if r.get("selection") == "test-peeking" else "")
            label += " ‡" if r.get("data_copy") else ""  # measured on an older copy of the data (footnote)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['epoch'] or '–'} | {sec} |")
        for p in PUBLISHED:
            if p["dataset"] != dataset:
                continue
            m = p["metrics"]
            cells = [f"{m[k]:.4f}" if k in m else "–" for k in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200", "NDCG@200")]
            lines.append(f"| *{p['model']}* | " + " | ".join(cells) + " | – | – | – |")
        if any(r.get("selection") == "test-peeking" for r in test):
            lines.append("\n† the reference code's protocol, for comparison only: trained on all but the last item, epoch "
                         "chosen on the test item itself (no validation split).")
        for copy in sorted({r["data_copy"] for r in test if r.get("data_copy")}):
            lines.append(f"\n‡ measured on {copy}.")
        lines.append("")
    return "\n".join(lines)


def write_table() -> None:
    rows = _load_rows()
    table = render_table(rows)
    write_between_markers(DOC, TABLE_START, TABLE_END, table)
    print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dataset", choices=list(DATASETS), required=True)
    r.add_argument("--model", choices=MODELS, required=True)
    r.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides (may be repeated)")
    r.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    r.add_argument("--name", help="row name and run directory (default: the model name)")
    bl = sub.add_parser("baselines")
    bl.add_argument("--ties-seed", type=int, default=None,
                    help="shuffle the interactions that share a timestamp (data.ties=shuffle) with this seed")
    for s in (r, bl, sub.add_parser("all")):
        s.add_argument("--data-dir", default=None,
                       help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
        s.add_argument("--threads", type=int, default=0)
    fz = sub.add_parser("finalize", help="test the best checkpoint of a run stopped by hand")
    fz.add_argument("--dataset", choices=list(DATASETS), required=True)
    fz.add_argument("--run-dir", required=True)
    fz.add_argument("--name", required=True)
    fz.add_argument("--data-dir", default=None,
                   help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    fz.add_argument("--threads", type=int, default=0)
    rf = sub.add_parser("refit", help="refit a finished run on train+valid for its best epoch count, test once")
    rf.add_argument("--dataset", choices=list(DATASETS), required=True)
    rf.add_argument("--name", required=True, help="the finished run to refit (runs/quality/<dataset>/<name>)")
    rf.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides (may be repeated)")
    rf.add_argument("--data-dir", default=None,
                   help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    rf.add_argument("--threads", type=int, default=0)
    sd = sub.add_parser("seeds", help="one mean ± sd row over finished runs that differ only in their seed")
    sd.add_argument("--dataset", choices=list(DATASETS), required=True)
    sd.add_argument("--names", nargs="+", required=True, help="the runs' row names")
    sd.add_argument("--row", required=True, help="the summary row's name")
    cp = sub.add_parser("compare", help="paired user bootstrap of test metrics, runs A against runs B")
    cp.add_argument("--dataset", choices=list(DATASETS), required=True)
    cp.add_argument("--a", nargs="+", required=True, help="finished runs of model A (one per seed)")
    cp.add_argument("--b", nargs="+", required=True, help="finished runs of model B (one per seed)")
    cp.add_argument("--metrics", nargs="+", default=["HR@10", "NDCG@10"])
    cp.add_argument("--resamples", type=int, default=1000)
    cp.add_argument("--data-dir", default=None,
                    help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    cp.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    lv = sub.add_parser("levers", help="paired comparisons of the lever study's runs; rewrite its docs table")
    lv.add_argument("--data-dir", default=None,
                    help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    lv.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    if args.cmd == "run":
        _save_rows(run_model(args.dataset, args.model, args.data_dir, args.threads, args.set, args.resume, args.name))
    elif args.cmd == "refit":
        _save_rows(refit_model(args.dataset, args.data_dir, args.threads, args.set, args.name))
    elif args.cmd == "seeds":
        _save_rows(seed_summary(args.dataset, args.names, args.row))
    elif args.cmd == "finalize":
        _save_rows(finalize_run(args.dataset, Path(args.run_dir).resolve(), args.name, args.data_dir, args.threads))
    elif args.cmd == "compare":
        import torch

        torch.set_num_threads(args.threads)
        _save_compare(compare_runs(args.dataset, args.a, args.b, args.metrics, args.data_dir, args.resamples))
    elif args.cmd == "levers":
        import torch

        torch.set_num_threads(args.threads)
        backfill_seconds_to_best()
        _save_compare(compare_levers(args.data_dir))
        write_levers()
    elif args.cmd == "baselines":
        for d in DATASETS:
            _save_rows(run_baselines(d, args.data_dir, MAX_LEN[d], args.ties_seed))
    elif args.cmd == "all":
        for d in DATASETS:
            _save_rows(run_baselines(d, args.data_dir, MAX_LEN[d]))
            for m in MODELS:
                if (ROOT / "configs" / d / f"{m}.yaml").exists():
                    _save_rows(run_model(d, m, args.data_dir, args.threads, []))
    if args.cmd in ("run", "refit", "finalize", "seeds", "baselines", "all", "table") and DOC.exists():
        write_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
