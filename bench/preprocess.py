"""Bounded-memory preprocessing at scale (a benchmark, not a test): wall time and peak memory of
``genrec.data.preprocess.preprocess_interactions`` on synthetic interaction logs of several sizes.

For each ``--rows`` size a seeded generator writes a log (Parquet by default, ``--format csv`` for text) in chunks,
so the generator itself stays small; then the preprocessing runs in a child process of its own, and that process's
peak resident memory is read from the kernel when it exits (``os.wait4``'s ``ru_maxrss``): the generator and this
script are not counted. A child that only imports polars and genrec's preprocessing gives ``baseline_rss_mb``, the
part of the peak that does not depend on the data. Peak memory that grows sub-linearly with rows is the point:
compare ``peak_rss_mb`` across sizes.

    python bench/preprocess.py --rows 1000000 2000000                # a quick check
    python bench/preprocess.py --rows 20000000 100000000             # the full benchmark (100M if the disk allows)

The synthetic log: ``rows / 40`` users with log-normal activity (heavy-tailed sequence lengths; some users end up
with fewer than 3 rows and are dropped), ``rows / 25`` items with Zipf(1.05) popularity, integer raw ids scrambled
over 40/48 bits, timestamps in time order (one day per million rows, one-second resolution), 5% of rows repeating
the previous row's user and timestamp with another item (same-timestamp ties), 0.5% exact duplicate rows, and an
``action`` column (click / cart / purchase) that is carried into the sequences.

Rows (``results/preprocess.json`` by default; rows of other sizes or machines already there are kept):
``{"rows", "format", "input_mb", "users", "items", "interactions", "partitions", "bucket_rows", "batch_rows",
"polars_threads", "wall_s", "rows_per_s", "peak_rss_mb", "baseline_rss_mb", "peak_mb_per_million_rows",
"output_mb", "polars", "machine", "command", "date"}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from readme_table import write_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK_ROWS = 1_000_000
T0 = 1_600_000_000


def generate(path: Path, rows: int, seed: int, fmt: str) -> None:
    """Write a synthetic log of ``rows`` rows (columns user, item, ts, action) in chunks of ``CHUNK_ROWS``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    num_users = max(100, rows // 40)
    num_items = max(100, rows // 25)
    activity = rng.lognormal(0.0, 1.2, num_users)
    user_cdf = np.cumsum(activity / activity.sum())
    popularity = 1.0 / np.arange(1, num_items + 1) ** 1.05
    item_cdf = np.cumsum(popularity / popularity.sum())
    item_of_rank = rng.permutation(num_items)
    actions = np.array(["click", "cart", "purchase"])
    schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("ts", pa.int64()), ("action", pa.string())])
    writer = (pq.ParquetWriter(path, schema, compression="zstd") if fmt == "parquet"
              else pacsv.CSVWriter(path, schema))
    try:
        done, chunk = 0, 0
        while done < rows:
            m = min(CHUNK_ROWS, rows - done)
            users = np.minimum(np.searchsorted(user_cdf, rng.random(m)), num_users - 1)
            items = item_of_rank[np.minimum(np.searchsorted(item_cdf, rng.random(m)), num_items - 1)]
            ts = T0 + chunk * 86_400 + np.sort(rng.integers(0, 86_400, m))
            act = actions[np.searchsorted([0.85, 0.95], rng.random(m), side="right")]
            tie = np.flatnonzero(rng.random(m) < 0.05)
            tie = tie[tie > 0]
            users[tie], ts[tie] = users[tie - 1], ts[tie - 1]
            dup = np.flatnonzero(rng.random(m) < 0.005)
            dup = dup[dup > 0]
            users[dup], items[dup], ts[dup], act[dup] = users[dup - 1], items[dup - 1], ts[dup - 1], act[dup - 1]
            raw_users = ((users.astype(np.uint64) * np.uint64(2654435761)) & np.uint64((1 << 40) - 1)).astype(np.int64)
            raw_items = ((items.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64((1 << 48) - 1))
            table = pa.table([raw_users, raw_items.astype(np.int64), ts, act], schema=schema)
            writer.write_table(table)
            done += m
            chunk += 1
    finally:
        writer.close()


def _child(spec: dict) -> None:
    """Run in the measured process: import, preprocess, write the figures to ``spec["result"]``."""
    import polars as pl

    from genrec.data.preprocess import preprocess_interactions

    if spec.get("baseline"):
        Path(spec["result"]).write_text(json.dumps({"polars": pl.__version__}))
        return
    t0 = time.perf_counter()
    manifest = preprocess_interactions(
        spec["input"], spec["output"], user="user", item="item", timestamp="ts", event="action",
        partitions=spec["partitions"], bucket_rows=spec["bucket_rows"], batch_rows=spec["batch_rows"],
        overwrite=True, command=spec["command"],
    )
    wall = time.perf_counter() - t0
    Path(spec["result"]).write_text(json.dumps({
        "wall_s": wall, "users": manifest["num_users"], "items": manifest["num_items"],
        "interactions": manifest["num_interactions"], "polars": pl.__version__,
        "polars_threads": pl.thread_pool_size(),
    }))


def measure(spec: dict) -> tuple[dict, float]:
    """Run ``_child(spec)`` in a fresh process; return its result and its peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the preprocessing process failed (exit status {proc.returncode})")
    return json.loads(Path(spec["result"]).read_text()), usage.ru_maxrss / 1024  # Linux: KiB


def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000_000, 100_000_000])
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--bucket-rows", type=int, default=2_000_000)
    parser.add_argument("--batch-rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/genrec-bench-preprocess", help="folder for the logs and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the generated logs and outputs")
    parser.add_argument("--out", default=str(ROOT / "results" / "preprocess.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    from genrec.runtime import machine_info

    machine = machine_info()
    command = shlex.join(["python", "bench/preprocess.py", *sys.argv[1:]])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    _, baseline_mb = measure({"baseline": True, "result": str(work / "baseline.json")})
    print(f"baseline (imports only): {baseline_mb:.0f} MiB peak RSS")
    out = Path(args.out)
    rows_out = json.loads(out.read_text()) if out.is_file() else []
    for rows in args.rows:
        # input (~12 bytes/row as Parquet, ~45 as CSV) + spill and output (~20 bytes/row), with room to spare
        need = rows * ((12 if args.format == "parquet" else 45) + 40)
        free = shutil.disk_usage(work).free
        if need > free:
            print(f"{rows:,} rows: skipped, needs about {need / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB free")
            continue
        log = work / f"log-{rows}.{args.format}"
        t0 = time.perf_counter()
        generate(log, rows, args.seed, args.format)
        print(f"{rows:,} rows: generated {log} ({_size_mb(log):.0f} MiB) in {time.perf_counter() - t0:.0f} s")
        output = work / f"out-{rows}"
        spec = {"input": str(log), "output": str(output), "partitions": args.partitions,
                "bucket_rows": args.bucket_rows, "batch_rows": args.batch_rows, "command": command,
                "result": str(work / f"result-{rows}.json")}
        res, peak_mb = measure(spec)
        row = {
            "rows": rows, "format": args.format, "input_mb": round(_size_mb(log), 1),
            "users": res["users"], "items": res["items"], "interactions": res["interactions"],
            "partitions": args.partitions, "bucket_rows": args.bucket_rows, "batch_rows": args.batch_rows,
            "polars_threads": res["polars_threads"], "wall_s": round(res["wall_s"], 2),
            "rows_per_s": round(rows / res["wall_s"]), "peak_rss_mb": round(peak_mb, 1),
            "baseline_rss_mb": round(baseline_mb, 1), "peak_mb_per_million_rows": round(peak_mb / (rows / 1e6), 2),
            "output_mb": round(_size_mb(output), 1), "polars": res["polars"], "machine": machine,
            "command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        print(f"{rows:,} rows: {row['wall_s']} s, {row['rows_per_s']:,} rows/s, peak RSS {row['peak_rss_mb']} MiB "
              f"({row['peak_mb_per_million_rows']} MiB per million rows)")
        key = (rows, args.format, args.partitions, args.bucket_rows, args.batch_rows, machine["cpu"])
        rows_out = [r for r in rows_out if (r["rows"], r["format"], r["partitions"], r["bucket_rows"],
                                            r["batch_rows"], r["machine"]["cpu"]) != key]
        rows_out.append(row)
        write_rows(out, sorted(rows_out, key=lambda r: (r["machine"]["cpu"], r["format"], r["rows"])))
        if not args.keep:
            log.unlink()
            shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    main()
