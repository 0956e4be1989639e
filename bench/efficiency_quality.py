"""What the efficiency switches cost in quality: bf16 autocast and Stochastic Length against the fp32 HSTU run.

A benchmark, not a test. Each variant is the dataset's HSTU config (``configs/<dataset>/hstu.yaml``) with one switch
changed, trained and selected exactly like the baseline row of ``bench/quality.py`` (early stopping on the validation
item, test measured once at the best epoch):

    bf16       train.autocast=bfloat16 (the encoder runs under CPU autocast; the loss stays fp32)
    sl-1.6     train.stochastic_length_alpha=1.6      (paper §3.3; expected sparsity printed and stored)
    sl-1.8     train.stochastic_length_alpha=1.8
    sl-2.0     train.stochastic_length_alpha=2.0

The fp32 baseline is the ``hstu`` run of ``bench/quality.py`` (``runs/quality/<dataset>/hstu``; run that first), or
the mean of the runs named by ``--baseline`` (e.g. the same config under several seeds).
Rows go to ``results/efficiency_quality.json`` (a JSON list of ``{"dataset", "variant", "split", "protocol",
"epoch", "seconds_per_epoch", "metrics", "relative_ndcg10", "stochastic_length"}``, where ``relative_ndcg10`` is the
variant's test NDCG@10 over the baseline's, minus 1), and the table is printed.

    python bench/efficiency_quality.py --dataset ml-1m --variants bf16 sl-1.6 sl-1.8 sl-2.0 --threads 1
    python bench/efficiency_quality.py --dataset ml-1m --variants bf16 --baseline hstu-seed42 hstu-seed1
    python bench/efficiency_quality.py --table          # print the table of what is there
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
from pathlib import Path

import quality

from genrec.runtime import machine_summary, native_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "efficiency_quality.json"
VARIANTS = {
    "bf16": ["train.autocast=bfloat16"],
    "sl-1.6": ["train.stochastic_length_alpha=1.6"],
    "sl-1.8": ["train.stochastic_length_alpha=1.8"],
    "sl-2.0": ["train.stochastic_length_alpha=2.0"],
}

log = logging.getLogger("bench.efficiency_quality")


def baseline_row(dataset: str, names: list[str] | None = None) -> dict:
    """The fp32 row: the finished ``runs/quality/<dataset>/<name>`` runs (default ``hstu``), averaged when several
    (the same config with different seeds)."""
    import numpy as np

    names = names or ["hstu"]
    results = []
    for name in names:
        run = ROOT / "runs" / "quality" / dataset / name / "results.json"
        if not run.exists():
            raise SystemExit(f"no fp32 baseline at {run}: run `python bench/quality.py run --dataset {dataset} "
                             f"--model hstu --name {name}` first")  # fmt: skip
        results.append(json.loads(run.read_text()))
    keys = [k for k in results[0]["test"]["metrics"] if all(k in r["test"]["metrics"] for r in results)]
    metrics = {k: float(np.mean([r["test"]["metrics"][k] for r in results])) for k in keys}
    return {"dataset": dataset, "variant": "fp32", "split": "test", "protocol": results[0]["test"]["protocol"],
            "epoch": "/".join(str(r["best_epoch"]) for r in results), "baseline_runs": names,
            "seconds_per_epoch": float(np.median([r["seconds_per_epoch"] for r in results])),
            "metrics": metrics, "relative_ndcg10": 0.0, "stochastic_length": None}  # fmt: skip


def run_variant(
    dataset: str, variant: str, data_dir: str, threads: int, extra: list[str], baseline: list[str] | None = None
) -> dict:
    base = baseline_row(dataset, baseline)
    if variant == "bf16" and not native_bf16("cpu"):  # the run would compute in fp32 (resolve_autocast)
        raise SystemExit(f"--variants bf16: this CPU has no native bf16 ({machine_summary()}); a bf16 run here "
                         "computes in fp32, so there is no bf16 quality to measure")  # fmt: skip
    name = f"hstu-{variant}"
    rows = quality.run_model(dataset, "hstu", data_dir, threads, VARIANTS[variant] + extra, name=name)
    test = next(r for r in rows if r["split"] == "test")
    res = json.loads((ROOT / "runs" / "quality" / dataset / name / "results.json").read_text())
    rel = test["metrics"]["NDCG@10"] / base["metrics"]["NDCG@10"] - 1.0
    return {"dataset": dataset, "variant": variant, "split": "test", "protocol": test["protocol"],
            "epoch": test["epoch"], "seconds_per_epoch": test["seconds_per_epoch"], "metrics": test["metrics"],
            "relative_ndcg10": rel, "stochastic_length": res.get("stochastic_length"),
            "overrides": VARIANTS[variant] + extra, "baseline_runs": base["baseline_runs"],
            "autocast": res.get("autocast"), "machine": res.get("machine")}  # fmt: skip


def save(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        merged = {(r["dataset"], r["variant"]): r for r in old}
        merged.update({(r["dataset"], r["variant"]): r for r in rows})
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(sorted(merged.values(), key=lambda r: (r["dataset"], r["variant"])), indent=2) + "\n")
        tmp.replace(RESULTS)


def table() -> str:
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    lines = ["| dataset | variant | test HR@10 | test NDCG@10 | NDCG@10 vs fp32 | tokens dropped | best epoch | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        sl = r.get("stochastic_length") or {}
        dropped = sl.get("measured_position_sparsity")
        rel = r.get("relative_ndcg10")  # None: no fp32 baseline to compare with (the row's notes say why)
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['metrics']['HR@10']:.4f} | {r['metrics']['NDCG@10']:.4f} | "
                     f"{'–' if rel is None else f'{100 * rel:+.1f}%'} | {'' if dropped is None else f'{100 * dropped:.1f}%'} | "
                     f"{r['epoch']} | {r['seconds_per_epoch']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(quality.DATASETS))
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--set", nargs="*", action="extend", default=[], help="extra config overrides for every variant (e.g. a budget)")
    p.add_argument("--baseline", nargs="*", default=None,
                   help="fp32 run names under runs/quality/<dataset>/ to compare with, averaged (default: hstu)")
    p.add_argument("--data-dir", default=None,
                   help="where the dataset files are (else $GENREC_DATA_DIR, then the cache directory)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--table", action="store_true", help="only print the table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.table:
        if args.dataset is None:
            p.error("--dataset is required unless --table")
        save([baseline_row(args.dataset, args.baseline)])
        for v in args.variants:
            save([run_variant(args.dataset, v, args.data_dir, args.threads, args.set, args.baseline)])
            print(table(), flush=True)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
