"""Big-to-small distillation: a large HSTU ranker teaches a small HSTU ranker and DLRM (a benchmark, not a test).

Roles (one dataset, one split; every run is ``genrec.train.ranking.train_ranker`` with its test part scored once at
the epoch chosen on validation mean NE):

* teacher: a large HSTU ranker (``TEACHER_PARAMS``), trained on the whole training part;
* stale teacher: the same model trained only on the training rows that start before the ``--stale-quantile``
  quantile of the training row times (``data.train_until``): a teacher that has not been refreshed;
* students: a small HSTU ranker and DLRM (``STUDENT_PARAMS``), each trained
  - ``none``: on the labels only (the undistilled student);
  - ``serving``: on ``(1 - α) · labels + α · p_teacher`` through its own heads (``train.distill_head=serving``);
  - ``aux``: labels on its heads, the teacher on one auxiliary head per task (``train.distill_head=aux``);
  - ``stale-serving``: as ``serving``, taught by the stale teacher.
  The teacher's logits on the training candidates are computed once per teacher
  (``genrec.train.distill.teacher_targets``) and shared by every student and seed.

Metrics per task (seed means): AUC, NE, calibration (Σ p / Σ y). Intervals: paired user bootstrap
(``genrec.eval.ranking_metrics.paired_bootstrap``, the same user draws for every comparison), 95% percentile:
each distilled student against the undistilled one (AUC, NE, |calibration − 1|), the teacher against the undistilled
student, and the transfer ratio TR = ΔNE_student / ΔNE_teacher = (NE_none − NE_distilled) / (NE_none − NE_teacher),
the share of the teacher–student NE gap the distillation closes, from the same resamples. Latency: median time to
score one request of one user's history and 1,000 candidates at one thread (the HSTU models through their
M-FALCON serving path, ``rank_cached``; DLRM through ``forward``), on this machine's CPU.

    python bench/lattice_distill.py --data-dir DIR                      # ML-1M, students seeds 0 1
    python bench/lattice_distill.py --markdown                          # the tables from results/ only

Rows (``results/lattice_distill.json``; rows with the same dataset, student, variant and task are replaced)::

    {"study": "distill", "dataset", "student" (teacher rows: "teacher" / "stale-teacher"), "variant", "task",
     "seeds", "metrics": {"AUC", "NE", "calibration"}, "per_seed", "ci": {"vs": "none", "AUC" | "NE" | "cal_error":
     {"diff", "low", "high", "excludes_zero"}, "TR": {"value", "low", "high"}, "teacher_gap": {...}} or null,
     "latency_ms_per_1k", "parameters", "seconds", "command", "protocol", "settings"}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import statistics
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
from genrec.eval.ranking_metrics import bootstrap_user_counts, paired_bootstrap  # noqa: E402
from genrec.io import write_json  # noqa: E402
from genrec.models.hstu_ranker import HSTURanker  # noqa: E402
from genrec.runtime import cpu_model  # noqa: E402
from genrec.train.checkpoint import load_weights  # noqa: E402
from genrec.train.distill import ServingHeads, teacher_targets  # noqa: E402
from genrec.train.ranking import build_run_model, load_predictions, load_teacher, train_ranker  # noqa: E402

STUDY = "distill"
RESULTS = ROOT / "results" / "lattice_distill.json"
TEACHER_PARAMS = {"variant": "summed", "embedding_dim": 128, "num_blocks": 2, "num_heads": 4, "attention_dim": 32,
                  "linear_dim": 32}  # fmt: skip
STUDENT_PARAMS = {
    "hstu-small": ("hstu-ranker", {"variant": "summed", "embedding_dim": 32, "num_blocks": 1, "num_heads": 1,
                                   "attention_dim": 16, "linear_dim": 16}),  # fmt: skip
    "dlrm": ("dlrm", {"embedding_dim": 16, "bottom_mlp": [64], "top_mlp": [64, 32], "history_pooling": "mean"}),
}
VARIANTS = ("none", "serving", "aux", "stale-serving")
PROTOCOL = (
    "Leave-last-out per user (ML-1M: each user's last 10 ratings test, the 10 before validation; tasks like = rating "
    ">= 4, love = 5); epoch chosen on validation mean NE, test scored once. Students and teachers share optimizer "
    "(AdamW, lr 1e-3, batch 128), history (50 most recent events) and output-bias initialisation (logit of the "
    "training base rate). metrics: seed means. ci: paired user bootstrap of seed means against the undistilled "
    "student (same resamples for every comparison), 95% percentile intervals; TR = (NE_none - NE_distilled) / "
    "(NE_none - NE_teacher) per resample."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--students", nargs="+", default=list(STUDENT_PARAMS), choices=list(STUDENT_PARAMS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.5, help="train.distill_weight")
    p.add_argument("--stale-quantile", type=float, default=0.5,
                   help="the stale teacher trains on training rows starting before this quantile of their times")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help=">0: cut every epoch to this many steps (smoke runs)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--latency-reps", type=int, default=20)
    p.add_argument("--runs", default=str(ROOT / "runs" / "lattice" / STUDY))
    p.add_argument("--resume", action="store_true", help="reuse finished runs (results.json present)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--markdown", action="store_true", help="print the tables of --out and exit")
    args = p.parse_args(argv)
    if "none" not in args.variants:
        p.error("--variants must include none: every distilled student is compared with it")
    if not 0.0 < args.stale_quantile < 1.0:
        p.error("--stale-quantile must lie in (0, 1)")
    words = sys.argv[1:] if argv is None else argv
    keep = [w for i, w in enumerate(words) if w != "--data-dir" and (i == 0 or words[i - 1] != "--data-dir")]
    args.command = ("python bench/lattice_distill.py " + shlex.join(keep)).strip()  # without the machine's data path
    return args


def config_for(args, name: str, model: str, params: dict, seed: int, **extra) -> RankingRunConfig:
    data = {k: v for k, v in extra.items() if k == "train_until"}
    train = {k: v for k, v in extra.items() if k != "train_until"}
    params = {**params, "task_base_rates": list(args.base_rates)}
    return RankingRunConfig(
        data=RankingDataConfig(dataset=args.dataset, data_dir=args.data_dir, max_history=args.max_history,
                               max_candidates=args.max_candidates, **data),  # fmt: skip
        model=RankingModelConfig(name=model, params=params),
        train=RankingTrainConfig(epochs=args.epochs, patience=args.patience, batch_size=128, lr=1e-3,
                                 select_metric="NE", seed=seed, num_threads=args.threads,
                                 max_steps_per_epoch=args.max_steps, **train),  # fmt: skip
        output_dir=str(Path(args.runs) / args.dataset / name / f"seed{seed}"),
    )


def run(args, ds, config: RankingRunConfig, teacher=None) -> dict:
    """Train (or, with --resume, read back) one run: its results and test predictions."""
    out = Path(config.output_dir)
    t0 = time.perf_counter()
    if args.resume and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())
    else:
        results = train_ranker(config, dataset=ds, teacher=teacher, overwrite=True, progress=False)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in log)
    print(f"  {out.relative_to(Path(args.runs))}: best epoch {results['best_epoch']} of {results['epochs_run']}, "
          f"{seconds:.0f}s ({time.perf_counter() - t0:.0f}s wall)", flush=True)  # fmt: skip
    return {"config": config, "results": results, "pred": load_predictions(out / "test_predictions.npz"),
            "seconds": seconds}  # fmt: skip


def train_all(args, ds) -> dict[tuple[str, str], list[dict]]:
    """{(student or teacher role, variant): [one run per seed]}."""
    runs: dict[tuple[str, str], list[dict]] = {}
    need_stale = "stale-serving" in args.variants
    teachers = {"teacher": {}}
    if need_stale:
        t0 = ds.rows("train", args.max_candidates).t0
        teachers["stale-teacher"] = {"train_until": int(np.quantile(t0, args.stale_quantile))}
    targets = {}
    for role, extra in teachers.items():
        cfg = config_for(args, role, "hstu-ranker", TEACHER_PARAMS, args.teacher_seed, **extra)
        runs[(role, "-")] = [run(args, ds, cfg)]
        model, tcfg = load_teacher(cfg.output_dir, ds)
        torch.set_num_threads(args.threads)
        targets[role] = teacher_targets(model, ds, "train", batch_size=256, max_history=tcfg.data.max_history,
                                        max_candidates=tcfg.data.max_candidates)  # fmt: skip
    for student in args.students:
        model, params = STUDENT_PARAMS[student]
        for variant in args.variants:
            role = "stale-teacher" if variant.startswith("stale") else "teacher"
            extra = {} if variant == "none" else {
                "distill_teacher": str(Path(args.runs) / args.dataset / role / f"seed{args.teacher_seed}"),
                "distill_head": variant.split("-")[-1], "distill_weight": args.alpha}  # fmt: skip
            runs[(student, variant)] = [
                run(args, ds, config_for(args, f"{student}-{variant}", model, params, seed, **extra),
                    teacher=None if variant == "none" else targets[role])  # fmt: skip
                for seed in args.seeds
            ]
    return runs


# ------------------------------------------------------------------------------------------------ latency
def latency_ms(run_dir: Path, ds, reps: int, candidates: int = 1000) -> float:
    """Median milliseconds to score one user's history and ``candidates`` candidates at one thread."""
    from genrec.config import load_ranking_config

    config = load_ranking_config(run_dir / "config.yaml")
    model = build_run_model(config, ds.schema)
    load_weights(run_dir / "best.safetensors", model)
    model.eval()
    rows = ds.rows("test", config.data.max_candidates)
    batch = ds.make_batch(rows, np.array([0]), config.data.max_history)
    rng = np.random.default_rng(0)
    items = torch.from_numpy(rng.integers(1, ds.schema.num_items + 1, size=(1, candidates)))
    D = batch.dense_features.shape[-1]
    batch = dataclasses.replace(
        batch, cand_items=items, cand_times=batch.cand_times[:, :1].expand(1, candidates).contiguous(),
        cand_mask=torch.ones(1, candidates, dtype=torch.bool), dense_features=torch.zeros(1, candidates, D),
        labels=None, label_weights=None, cand_domains=None)  # fmt: skip
    inner = model.inner if isinstance(model, ServingHeads) else model
    torch.set_num_threads(1)
    with torch.no_grad():
        if isinstance(inner, HSTURanker):
            tables = inner.candidate_tables()

            def score():
                return inner.rank_cached(batch, microbatch=256, tables=tables)
        else:

            def score():
                return model(batch)

        score()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            score()
            times.append(1000 * (time.perf_counter() - t0))
    return float(statistics.median(times))


# ------------------------------------------------------------------------------------------------ rows
def _interval(samples: np.ndarray, point: float) -> dict:
    lo, hi = (float(x) for x in np.quantile(samples, [0.025, 0.975]))
    return {"diff": float(point), "low": lo, "high": hi, "excludes_zero": bool(lo > 0 or hi < 0)}


def _cal_error_samples(probs: np.ndarray, labels: np.ndarray, users: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[R] |Σ p / Σ y − 1| of the seed-mean calibration on each resample (counts [R, U] per user)."""
    _, uidx = np.unique(users, return_inverse=True)
    U = counts.shape[1]
    ysum = np.bincount(uidx, weights=labels, minlength=U)  # [U]
    out = []
    for p in probs:  # [N] per seed
        psum = np.bincount(uidx, weights=p, minlength=U)
        out.append(np.abs((counts @ psum) / (counts @ ysum) - 1.0))
    return np.mean(out, axis=0)


def make_rows(args, ds, runs: dict, latency: dict) -> list[dict]:
    tasks = ds.schema.tasks
    reference = runs[("teacher", "-")][0]["pred"]
    for group in runs.values():
        for r in group:  # every run scored the same test candidates in the same order
            load_predictions(Path(r["config"].output_dir) / "test_predictions.npz", like=reference)
    users = reference.user_ids
    counts = bootstrap_user_counts(np.unique(users).size, args.resamples, seed=0)
    settings = {"teacher_params": TEACHER_PARAMS, "student_params": {k: v[1] for k, v in STUDENT_PARAMS.items()},
                "alpha": args.alpha, "stale_quantile": args.stale_quantile, "epochs_cap": args.epochs,
                "patience": args.patience, "max_history": args.max_history, "max_candidates": args.max_candidates,
                "threads": args.threads, "max_steps_per_epoch": args.max_steps, "teacher_seed": args.teacher_seed,
                "cpu": cpu_model()}  # fmt: skip
    rows = []
    for (who, variant), group in runs.items():
        num_params = int(sum(p.numel() for p in build_run_model(group[0]["config"], ds.schema).parameters()))
        for k, task in enumerate(tasks):
            y = reference.labels[:, k]
            probs = np.stack([r["pred"].probs[:, k] for r in group])  # [S, N]
            per_seed = [{"seed": r["config"].train.seed, "best_epoch": r["results"]["best_epoch"],
                         **{m: r["results"]["test"]["metrics"][task][key] for m, key in
                            (("AUC", "auc"), ("NE", "ne"), ("calibration", "calibration"))}}
                        for r in group]  # fmt: skip
            metrics = {m: float(np.mean([s[m] for s in per_seed])) for m in ("AUC", "NE", "calibration")}
            ci = None
            if who in STUDENT_PARAMS:
                base = np.stack([r["pred"].probs[:, k] for r in runs[(who, "none")]])
                teacher_role = "stale-teacher" if variant.startswith("stale") else "teacher"
                teacher = runs[(teacher_role, "-")][0]["pred"].probs[:, k][None]
                gap = paired_bootstrap(base, teacher, y, users, num_resamples=args.resamples, seed=0,
                                       metrics=("auc", "ne"))  # fmt: skip
                ci = {"vs": "none", "teacher": teacher_role,
                      "teacher_gap": {"AUC": _entry(gap["auc"]), "NE": _entry(gap["ne"])}}  # fmt: skip
                if variant != "none":
                    d = paired_bootstrap(probs, base, y, users, num_resamples=args.resamples, seed=0,
                                         metrics=("auc", "ne"))  # fmt: skip
                    ci["AUC"], ci["NE"] = _entry(d["auc"]), _entry(d["ne"])
                    ce = _cal_error_samples(probs, y, users, counts) - _cal_error_samples(base, y, users, counts)
                    point = (np.mean([abs(s["calibration"] - 1) for s in per_seed])
                             - np.mean([abs(r["results"]["test"]["metrics"][task]["calibration"] - 1)
                                        for r in runs[(who, "none")]]))  # fmt: skip
                    ci["cal_error"] = _interval(ce, point)
                    # TR per resample: (NE_none - NE_distilled) / (NE_none - NE_teacher), same user draws
                    gain, gap_s = -d["ne"].samples, gap["ne"].samples  # NE(none) - NE(distilled); NE(none) - NE(t)
                    if gain.size == gap_s.size == args.resamples:
                        tr = gain / gap_s
                        value = -d["ne"].diff / gap["ne"].diff
                        lo, hi = (float(x) for x in np.quantile(tr, [0.025, 0.975]))
                        ci["TR"] = {"value": float(value), "low": lo, "high": hi}
            rows.append({
                "study": STUDY, "dataset": ds.name, "split": ds.split, "student": who, "variant": variant,
                "task": task, "seeds": [s["seed"] for s in per_seed], "metrics": metrics, "per_seed": per_seed,
                "ci": ci, "latency_ms_per_1k": latency.get((who, variant)),
                "parameters": num_params,
                "seconds": round(sum(r["seconds"] for r in group), 1), "smoke": args.max_steps > 0,
                "command": args.command, "protocol": PROTOCOL, "settings": settings,
            })  # fmt: skip
    return rows


def _entry(d) -> dict:
    return {"diff": d.diff, "low": d.ci_low, "high": d.ci_high, "excludes_zero": d.excludes_zero}


def merge_rows(out: Path, rows: list[dict]) -> None:
    def key(r: dict) -> tuple:
        return (r["dataset"], r["student"], r["variant"], r["task"])

    old = json.loads(out.read_text()) if out.exists() else []
    new = {key(r) for r in rows}
    write_json(out, [r for r in old if key(r) not in new] + rows)


# ------------------------------------------------------------------------------------------------ tables
def _ci(c: dict | None, metric: str, digits: int = 4) -> str:
    if not c or metric not in c:
        return ""
    d = c[metric]
    return f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]" + ("*" if d["excludes_zero"]
                                                                                           else "")  # fmt: skip


def tr_text(ci: dict | None) -> str:
    """TR with its interval; when the teacher is not measurably better than the student (the NE gap's interval
    includes 0 or lies on the wrong side) there is no gap to close and the ratio means nothing."""
    tr = (ci or {}).get("TR")
    if not tr:
        return ""
    gap = ci["teacher_gap"]["NE"]  # NE(student) - NE(teacher): > 0 when the teacher is better
    text = f"{tr['value']:.2f} [{tr['low']:.2f}, {tr['high']:.2f}]"
    return text if gap["excludes_zero"] and gap["diff"] > 0 else f"{text} (no gap: teacher not better)"


def markdown_tables(path: str | Path = RESULTS) -> str:
    rows = [r for r in json.loads(Path(path).read_text()) if r.get("study") == STUDY]
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        r0 = rs[0]
        for task in dict.fromkeys(r["task"] for r in rs):
            seeds = next((r["seeds"] for r in rs if r["student"] in STUDENT_PARAMS), r0["seeds"])
            out.append(f"### {dataset}, task {task} (students: seeds {seeds}; teachers: seed {r0['seeds']}; smoke "
                       f"run: {r0['smoke']})\n")  # fmt: skip
            out.append("| model | distillation | AUC | NE | calibration | ΔAUC vs undistilled | ΔNE vs undistilled | "
                       "Δ calibration error vs undistilled | TR (share of the NE gap closed) | params | ms / 1k candidates |")
            out.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in (x for x in rs if x["task"] == task):
                m, c = r["metrics"], r["ci"]
                trs = tr_text(c)
                lat = r.get("latency_ms_per_1k")
                out.append(f"| {r['student']} | {r['variant']} | {m['AUC']:.4f} | {m['NE']:.4f} | "
                           f"{m['calibration']:.3f} | {_ci(c, 'AUC')} | {_ci(c, 'NE')} | {_ci(c, 'cal_error', 3)} | "
                           f"{trs} | {r['parameters']:,} | {'' if lat is None else f'{lat:.1f}'} |")  # fmt: skip
            gaps = [(r["student"], r["ci"]["teacher_gap"]) for r in rs
                    if r["task"] == task and r["variant"] == "none" and r["ci"]]  # fmt: skip
            if gaps:
                out.append("\nUndistilled student − teacher (the gap TR divides by; AUC negative and NE positive = "
                           "the teacher is better): " + "; ".join(f"{s}: AUC {_ci({'x': g['AUC']}, 'x')}, NE {_ci({'x': g['NE']}, 'x')}"
                                                  for s, g in gaps) + "\n")  # fmt: skip
        out.append(f"Command: `{r0['command']}`. CPU: {r0['settings']['cpu']}.\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_tables(args.out))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    ds = load_ranking_dataset(args.dataset, data_dir=args.data_dir, max_candidates=args.max_candidates)
    print(ds.describe(args.max_candidates), flush=True)
    args.dataset = ds.name
    rates = ds.counts("train", args.max_candidates)["base_rates"]
    args.base_rates = tuple(min(max(float(rates[t]), 1e-4), 1 - 1e-4) for t in ds.schema.tasks)
    runs = train_all(args, ds)
    latency = {key: latency_ms(Path(group[0]["config"].output_dir), ds, args.latency_reps)
               for key, group in runs.items()}  # fmt: skip
    rows = make_rows(args, ds, runs, latency)
    merge_rows(Path(args.out), rows)
    print(markdown_tables(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
