"""Time to the best epoch of every shipped retrieval config (a benchmark, not a test).

For each config under ``configs/ml-1m/`` and ``configs/amazon-beauty/`` (ranking configs aside), trains it for
``--epochs`` epochs (default 2) in this process with ``--threads`` threads and records the last epoch's training and
validation seconds (with 2, the first warms up; 1 gives an upper bound). Configs that differ only in their schedule
(epochs, learning-rate schedule, warm-up, patience) train at the same speed and are timed once. The best-validation
epochs come from the config's recorded runs in ``results/quality.json`` (``CONFIG_RUNS`` names them; the runs of one
config differ only in their seed), so

    time to the best epoch = (training + validation seconds of one epoch) x the latest best epoch of its runs

is an estimate for a machine like this one running nothing else: the recorded runs themselves shared the CPU.

    python bench/config_times.py --data-dir ../shared/data --threads 2     # writes results/config_times.json

and rewrites the table between ``<!-- config-times:start -->`` and ``<!-- config-times:end -->`` in
docs/reproducing-hstu.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

from readme_table import write_between_markers, write_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "reproducing-hstu.md"
START, END = "<!-- config-times:start -->", "<!-- config-times:end -->"
LIMIT_MINUTES = 120

# config -> the results/quality.json test rows (dataset, model) of its recorded runs, one per seed
CONFIG_RUNS = {
    "configs/ml-1m/sasrec.yaml": ["sasrec-seed1", "sasrec-seed42"],
    "configs/ml-1m/hstu.yaml": ["hstu-seed42", "hstu-seed1"],
    "configs/ml-1m/hstu-cosine.yaml": ["hstu-cos40-seed42", "hstu-cos40-seed1"],
    "configs/ml-1m/hstu-large.yaml": ["hstu-large-seed1", "hstu-large-seed42"],
    "configs/ml-1m/hstu-large-cosine.yaml": ["hstu-large-cosine120-seed42", "hstu-large-cosine120-seed1"],
    "configs/ml-1m/fuxi-alpha.yaml": ["fuxi-alpha-cos40-seed42", "fuxi-alpha-cos40-seed1"],
    "configs/amazon-beauty/sasrec.yaml": ["sasrec", "sasrec-seed1"],
    "configs/amazon-beauty/hstu.yaml": ["hstu-refinit-seed42", "hstu-seed1"],
    "configs/amazon-beauty/hstu-cosine.yaml": ["hstu-cos60-seed42", "hstu-cos60-seed1"],
    "configs/amazon-beauty/hstu-inbatch.yaml": ["hstu-cos60-inbatch256-seed42", "hstu-cos60-inbatch256-seed1"],
    "configs/amazon-beauty/fuxi-alpha.yaml": ["fuxi-alpha-cos60-seed42", "fuxi-alpha-cos60-seed1"],
}


def shipped_configs() -> list[Path]:
    """Every retrieval config of the two benchmark datasets (ranking configs are timed by bench/ranking.py)."""
    return sorted(p for d in ("ml-1m", "amazon-beauty") for p in (ROOT / "configs" / d).glob("*.yaml")
                  if not p.name.startswith("ranking-"))  # fmt: skip


def best_epochs(config: str, rows: list[dict]) -> list[int] | None:
    """The best-validation epochs of the config's recorded runs; None if any is missing."""
    dataset = Path(config).parent.name
    test = {r["model"]: r for r in rows if r["dataset"] == dataset and r["split"] == "test"}
    names = CONFIG_RUNS.get(config, [])
    if not names or any(n not in test for n in names):
        return None
    return [int(test[n]["epoch"]) for n in names]


SCHEDULE_FIELDS = ("epochs", "lr_schedule", "warmup_epochs", "min_lr_ratio", "patience")


def speed_key(config: Path) -> str:
    """What decides a config's epoch time: everything but its output directory and its schedule."""
    from genrec.config import load_config

    d = load_config(config).to_dict()
    d.pop("output_dir", None)
    for field in SCHEDULE_FIELDS:
        d["train"].pop(field, None)
    return json.dumps(d, sort_keys=True)


def time_epoch(config: Path, data_dir: str | None, threads: int, data_cache: dict, epochs: int = 2) -> tuple[float, float]:
    """(training, validation) seconds of the last of ``epochs`` epochs of ``config``."""
    from genrec.config import load_config
    from genrec.data.dataset import prepare_data
    from genrec.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*([f"data.data_dir={data_dir}"] if data_dir else []), f"output_dir={tmp}",
                                   f"train.epochs={epochs}", f"train.patience={epochs}", "train.lr_schedule=constant",
                                   "train.warmup_epochs=0", f"train.num_threads={threads}"])  # fmt: skip
        key = cfg.data.dataset, cfg.data.max_len
        if key not in data_cache:
            data_cache[key] = prepare_data(cfg.data)
        train(cfg, data=data_cache[key], progress=False)
        last = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()][-1]
    return float(last["train_seconds"]), float(last["eval_seconds"])


def render(rows: list[dict]) -> str:
    lines = [f"| config | s/epoch, training + validation | best epochs of its runs | time to the best epoch | "
             f"within {LIMIT_MINUTES} min |", "|---|---|---|---|---|"]
    for r in rows:
        best = "/".join(map(str, r["best_epochs"])) if r["best_epochs"] else "not recorded"
        minutes = f"{r['minutes_to_best']:.0f} min" if r["minutes_to_best"] is not None else "–"
        ok = "–" if r["minutes_to_best"] is None else "yes" if r["minutes_to_best"] <= LIMIT_MINUTES else "**no**"
        lines.append(f"| `{r['config']}` | {r['train_seconds']:.1f} + {r['eval_seconds']:.1f} | {best} | {minutes} | {ok} |")
    m = rows[0]["machine"] if rows else {}
    timed = rows[0].get("epochs_timed", 2) if rows else 2
    lines.append(f"\n{rows[0]['threads'] if rows else '?'} threads, nothing else running, epoch {timed} of {timed} timed; "
                 f"{m.get('cpu', '?')} ({m.get('isa', '?')}); {rows[0]['date'] if rows else ''}. Command: "
                 f"`python bench/config_times.py --data-dir DIR --threads 2 --epochs {timed}`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="epochs per config; the last one is timed")
    p.add_argument("--configs", nargs="*", default=None, help="default: every shipped retrieval config")
    p.add_argument("--out", default=str(ROOT / "results" / "config_times.json"))
    args = p.parse_args(argv)

    import torch

    from genrec.runtime import machine_info

    torch.set_num_threads(args.threads)
    quality = json.loads((ROOT / "results" / "quality.json").read_text())
    configs = [ROOT / c for c in args.configs] if args.configs else shipped_configs()
    info = machine_info()
    machine = {"cpu": info["cpu"], "isa": "PyTorch " + str(info["torch_cpu_capability"]) + ", " + "/".join(info["isa"])}
    cache: dict = {}
    timed: dict[str, tuple[float, float]] = {}
    rows = []
    for config in configs:
        name = str(config.relative_to(ROOT))
        key = speed_key(config)
        if key not in timed:
            timed[key] = time_epoch(config, args.data_dir, args.threads, cache, args.epochs)
        train_s, eval_s = timed[key]
        best = best_epochs(name, quality)
        minutes = None if best is None else max(best) * (train_s + eval_s) / 60
        rows.append({"config": name, "threads": args.threads, "epochs_timed": args.epochs,
                     "train_seconds": round(train_s, 2), "eval_seconds": round(eval_s, 2), "best_epochs": best,
                     "minutes_to_best": None if minutes is None else round(minutes, 1), "machine": machine,
                     "date": dt.date.today().isoformat()})  # fmt: skip
        print(f"{name}: {train_s:.1f} + {eval_s:.1f} s per epoch, best epochs {best}, "
              f"{'–' if minutes is None else f'{minutes:.0f} min'} to the best epoch", flush=True)
    write_rows(args.out, rows)
    table = render(rows)
    write_between_markers(DOC, START, END, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
