"""The serving forward pass alone (a benchmark, not a test): ``Recommender.execute`` time per request by batch size.

What ``bench/serve_load.py`` measures end to end, without HTTP: one batch of prepared top-10 queries through the
encoder, the full-catalogue scores and top-k, on one thread. Per batch size it times both encoder paths of
``HSTU`` with ``attention_impl: jagged`` (the padded path and the jagged layout, forced in turn; ``jagged_pays``
picks between them in serving) interleaved round by round, and counts minor page faults per batch. Each
``--malloc`` mode runs in its own process: ``kept`` calls ``genrec.runtime.keep_freed_memory()`` first (as
``genrec serve`` does), ``default`` leaves glibc's malloc as it is.

    python bench/serve_forward.py --checkpoint runs/quality/ml-1m/hstu
    python bench/serve_forward.py --checkpoint DIR --histories 200 --batches 16 --malloc default kept

Histories: ``200`` = 200 distinct items each with increasing timestamps (the load test's), ``mixed`` = 20-200
items. Rows (``results/serve_forward.json`` by default):
``{"malloc", "histories", "batch", "path", "ms_per_request", "faults_per_batch", "reps"}``.

``--ranker DIR`` also times the ranking stage of the two-stage service (``genrec serve --ranker DIR``) per batch
size: each history's events carry one of the ranker's actions (drawn uniformly), its candidates are the retriever's
top ``--retrieve-k``, and rows ``"path": "rank-prepare"`` (``Ranker.prepare_rank`` of the request's history, as the
service does when a request arrives) and ``"path": "rank"`` (``Ranker.execute`` of the batch: one M-FALCON pass per
history) give ms per request, with ``"ranker"`` (its model id) and ``"retrieve_k"``.

    python bench/serve_forward.py --checkpoint runs/serve-ml1m-hstu --ranker runs/serve-ml1m-ranker --batches 1 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from readme_table import write_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(checkpoint: str, malloc: str, kinds: list[str], batches: list[int], reps: int, seed: int,
            ranker_dir: str | None = None, retrieve_k: int = 200) -> list[dict]:
    import resource

    import numpy as np
    import torch

    import genrec.ops.jagged as jagged
    from genrec.api import Events, Recommender
    from genrec.runtime import keep_freed_memory

    if malloc == "kept":
        keep_freed_memory()
    torch.set_num_threads(1)
    rec = Recommender.load(checkpoint)
    items = rec.item_map_.to_external(range(1, len(rec.item_map_) + 1))
    rng = np.random.default_rng(seed)

    def query(n: int):
        ids = rng.choice(items, n, replace=False).tolist()
        return rec.prepare_recommend(Events(ids, list(range(978_300_000, 978_300_000 + 10 * n, 10))), 10, True)

    paths = {"padded": lambda lengths, width, grad: False, "jagged": lambda lengths, width, grad: True}
    chooser = jagged.jagged_pays
    rows = []
    try:
        for kind in kinds:
            for B in batches:
                queries = [query(200 if kind == "200" else int(rng.integers(20, 201))) for _ in range(B)]
                times: dict[str, list[float]] = {p: [] for p in paths}
                faults: dict[str, int] = {p: 0 for p in paths}
                for name, rule in paths.items():  # warm-up
                    jagged.jagged_pays = rule
                    rec.execute(queries)
                for _ in range(reps):
                    for name, rule in paths.items():
                        jagged.jagged_pays = rule
                        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        start = time.perf_counter()
                        rec.execute(queries)
                        times[name].append(time.perf_counter() - start)
                        faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                for name in paths:
                    ms = statistics.median(times[name]) * 1e3 / B
                    rows.append({"malloc": malloc, "histories": kind, "batch": B, "path": name,
                                 "ms_per_request": round(ms, 3), "faults_per_batch": round(faults[name] / reps),
                                 "reps": reps})  # fmt: skip
                    print(f"malloc {malloc:7s} histories {kind:5s} batch {B:3d} {name:6s} {ms:6.3f} ms/request "
                          f"{faults[name] / reps:7.0f} faults/batch", flush=True)  # fmt: skip
    finally:
        jagged.jagged_pays = chooser
    if ranker_dir:
        rows += measure_ranker(rec, ranker_dir, malloc, kinds, batches, reps, seed, retrieve_k)
    return rows


def measure_ranker(rec, ranker_dir: str, malloc: str, kinds: list[str], batches: list[int], reps: int, seed: int,
                   retrieve_k: int) -> list[dict]:
    """The two-stage service's ranking stage: ``Ranker.prepare_rank`` per request and ``Ranker.execute`` of a
    batch of histories, each with the retriever's top ``retrieve_k`` as candidates."""
    import resource

    import numpy as np

    from genrec.api import Events
    from genrec.ranking_api import Ranker

    ranker = Ranker.load(ranker_dir)
    actions = list(ranker.state_.schema.actions)
    items = rec.item_map_.to_external(range(1, len(rec.item_map_) + 1))
    rng = np.random.default_rng(seed + 1)

    def history(n: int) -> list[dict]:
        ids = rng.choice(items, n, replace=False).tolist()
        picks = rng.integers(0, len(actions), size=n)
        return [{"item": i, "ts": 978_300_000 + 10 * j, "actions": [actions[a]]} for j, (i, a) in enumerate(zip(ids,
                picks))]  # fmt: skip

    rows = []
    for kind in kinds:
        for B in batches:
            events = [history(200 if kind == "200" else int(rng.integers(20, 201))) for _ in range(B)]
            retrieved = rec.execute([rec.prepare_recommend(Events([e["item"] for e in h], [e["ts"] for e in h]),
                                                           retrieve_k, True) for h in events])  # fmt: skip
            prepare = lambda: [ranker.prepare_rank(h, r.items) for h, r in zip(events, retrieved)]  # noqa: E731
            queries = prepare()
            work = {"rank-prepare": prepare, "rank": lambda: ranker.execute(queries)}
            for run in work.values():  # warm-up
                run()
            times: dict[str, list[float]] = {p: [] for p in work}
            faults: dict[str, int] = {p: 0 for p in work}
            for _ in range(reps):
                for name, run in work.items():
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            for name in work:
                ms = statistics.median(times[name]) * 1e3 / B
                rows.append({"malloc": malloc, "histories": kind, "batch": B, "path": name,
                             "ms_per_request": round(ms, 3), "faults_per_batch": round(faults[name] / reps),
                             "reps": reps, "ranker": ranker.model_id, "retrieve_k": retrieve_k})  # fmt: skip
                print(f"malloc {malloc:7s} histories {kind:5s} batch {B:3d} {name:12s} {ms:6.3f} ms/request "
                      f"{faults[name] / reps:7.0f} faults/batch", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--histories", nargs="+", choices=["200", "mixed"], default=["200", "mixed"])
    p.add_argument("--malloc", nargs="+", choices=["kept", "default"], default=["kept", "default"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranker", help="a ranking model directory: also time the two-stage ranking stage")
    p.add_argument("--retrieve-k", type=int, default=200, help="with --ranker: candidates per history")
    p.add_argument("--out", default=str(ROOT / "results" / "serve_forward.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one malloc mode in this process
    args = p.parse_args(argv)
    if args.worker:
        rows = measure(args.checkpoint, args.worker, args.histories, args.batches, args.reps, args.seed,
                       args.ranker, args.retrieve_k)
        print("ROWS " + json.dumps(rows))
        return 0
    rows = []
    for mode in args.malloc:  # one process per mode: malloc settings cannot be undone within a process
        cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--worker", mode, "--reps", str(args.reps),
               "--seed", str(args.seed), "--batches", *map(str, args.batches), "--histories", *args.histories,
               *(["--ranker", args.ranker, "--retrieve-k", str(args.retrieve_k)] if args.ranker else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            if line.startswith("ROWS "):
                rows += json.loads(line[5:])
            else:
                print(line, flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
