"""One ML-1M training epoch on one process and on two data-parallel processes (a benchmark, not a test).

Runs ``genrec train`` three times on the same config for ``--epochs`` epochs: one process with one thread, one
process with two threads, and ``--nproc 2`` (torchrun, gloo) with one thread per process, and reports each run's
training and evaluation seconds per epoch (the last epoch's, after the first has warmed up) and the speed-ups. On a
2-core machine two processes compete with nothing else, so the two-process figure is what data parallelism buys
over PyTorch's own threads there.

    python bench/ddp_epoch.py --data-dir ../shared/data                 # configs/ml-1m/hstu.yaml, 2 epochs
    python bench/ddp_epoch.py --config configs/ml-1m/hstu-large.yaml --epochs 2

Rows (``results/ddp_epoch.json``): ``{"config", "processes", "threads_per_process", "train_seconds",
"eval_seconds", "loss", "machine", "command", "date"}`` plus ``speedup_*`` in the two-process row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from readme_table import write_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrec.runtime import machine_info  # noqa: E402

RUNS = (("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1))  # name, processes, threads per process


def run(config: str, data_dir: str | None, epochs: int, processes: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "genrec", "train", "--config", config, "--output-dir", str(out), "--no-progress",
           "--set", f"train.epochs={epochs}", "--set", f"train.num_threads={threads}"]  # fmt: skip
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if processes > 1:
        cmd += ["--nproc", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    return {"train_seconds": round(last["train_seconds"], 2), "eval_seconds": round(last["eval_seconds"], 2),
            "loss": round(last["loss"], 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ml-1m/hstu.yaml")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "ddp_epoch.json"))
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/ddp_epoch.py", *(sys.argv[1:] if argv is None else argv)])
    machine, date = machine_info(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="genrec-ddp-") as tmp:
        for name, processes, threads in RUNS:
            got = run(args.config, args.data_dir, args.epochs, processes, threads, Path(tmp) / name)
            rows[name] = {"config": args.config, "processes": processes, "threads_per_process": threads, **got,
                          "machine": machine, "command": command, "date": date}  # fmt: skip
            print(f"{processes} process(es) x {threads} thread(s): {got['train_seconds']:.1f} s train, "
                  f"{got['eval_seconds']:.1f} s eval per epoch (loss {got['loss']:.4f})", flush=True)
    two = rows["2x1"]
    two["speedup_vs_1x1"] = round(rows["1x1"]["train_seconds"] / two["train_seconds"], 2)
    two["speedup_vs_1x2"] = round(rows["1x2"]["train_seconds"] / two["train_seconds"], 2)
    print(f"2 processes: {two['speedup_vs_1x2']:.2f}x one process with 2 threads, {two['speedup_vs_1x1']:.2f}x one "
          "process with 1 thread (training seconds per epoch)")
    write_rows(args.out, list(rows.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
