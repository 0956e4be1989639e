"""Load test of the HTTP service (a benchmark, not a test): latency and throughput at concurrency 1, 8 and 32.

Starts ``genrec serve`` on a free loopback port in a subprocess, drives ``POST /v1/recommend`` (top-10) over real
HTTP/1.1 from asyncio callers, one keep-alive connection each, and reports p50/p99 latency,
throughput and errors (any non-200 or transport failure) per concurrency level. The levels run ``--rounds`` times,
interleaved (1, 8, 32, 1, 8, 32, ...), so that a drift in the machine's speed hits all of them; the ratio of
throughputs is the median of the rounds' ratios. Rows go to ``results/serve.json``
(a JSON list of ``{"concurrency", "requests", "errors", "p50_ms", "p99_ms", "rps", ...}``, plus each round's req/s,
the mean batch and the CPU time per request of server and client), the markdown table is printed
and written into docs/serving.md between ``<!-- serve-table:start -->`` and ``<!-- serve-table:end -->`` when present.

    python bench/serve_load.py --checkpoint runs/ml-1m/hstu --workers 2          # 3 rounds x 1,000 requests per level
    python bench/serve_load.py --checkpoint DIR --requests 100 --rounds 1 --max-seconds 5   # smoke run
    python bench/serve_load.py --checkpoint DIR --histories dataset --no-readme  # real users' histories
    python bench/serve_load.py --checkpoint DIR --ranker RANKER_DIR --workers 2   # two-stage: retrieve 200, re-rank

Histories are drawn from the model's own catalogue (popularity-weighted when ``popularity.json`` is there), each
``--history-len`` events long (default: the model's max_len, the most work per request) with increasing timestamps,
so the time term is on. Each level is bounded by ``--requests`` and by ``--max-seconds``; the client and the server
share this machine's cores.

``--workers 2`` runs two server processes on the one socket (``genrec serve --workers 2``), each with its own model
and batcher; the server's CPU time is summed over its processes.

``--ranker DIR`` measures the two-stage service (``genrec serve --ranker DIR --retrieve-k N``): each request retrieves
``--retrieve-k`` items (default 200) and re-ranks them with the ranker; each synthetic history event carries one of the
ranker's action names (drawn uniformly). Rows get ``"path": "two-stage"`` (the one-stage rows ``"path": "retrieval"``),
with both models' ids and configurations; ``results/serve.json`` keeps the rows of the other path (a run replaces only
the rows of its own path), and the table goes between ``<!-- serve-two-stage-table:start -->`` and
``<!-- serve-two-stage-table:end -->``.

Client: by default a minimal HTTP/1.1 client on asyncio streams (``RawClient``: request line, headers,
Content-Length or chunked body), because on a 2-core machine httpx's ~1 ms of CPU per request would be taken from the
server being measured; ``--client httpx`` runs the same load through httpx to cross-check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from readme_table import write_between_markers

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "serve.json"
DOC = ROOT / "docs" / "serving.md"
TABLE_START, TABLE_END = "<!-- serve-table:start -->", "<!-- serve-table:end -->"
TWO_STAGE_START, TWO_STAGE_END = "<!-- serve-two-stage-table:start -->", "<!-- serve-two-stage-table:end -->"
JSON_HEADERS = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "genrec.cli", "serve", "--checkpoint", str(args.checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(args.server_threads), "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms), "--workers", str(args.workers), "--log-level", "warning"]  # fmt: skip
    cmd += ["--model-thread"] if args.model_thread else []
    if args.ranker is not None:
        cmd += ["--ranker", str(args.ranker), "--retrieve-k", str(args.retrieve_k)]
        cmd += ["--task-weights", args.task_weights] if args.task_weights else []
    return subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"genrec serve exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/healthz", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"genrec serve did not become healthy within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request_bodies(
    checkpoint: Path, n: int, length: int, k: int, seed: int, actions: list[str] | None = None
) -> list[bytes]:
    """``n`` pre-serialised request bodies with ``length``-event timed histories from the model's catalogue; with
    ``actions`` (the two-stage service), each event carries one of them, drawn uniformly."""
    items = json.loads((checkpoint / "item_ids.json").read_text())
    weights = np.ones(len(items))
    pop = checkpoint / "popularity.json"
    if pop.exists():
        counts = json.loads(pop.read_text())["counts"]
        weights = np.asarray([counts.get(i, 0) for i in items], dtype=np.float64) + 1.0
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        picks = rng.choice(len(items), size=length, p=weights / weights.sum())
        ts = 978_300_000 + np.cumsum(rng.integers(1, 3_600, size=length))
        history = [{"item": items[i], "ts": int(t)} for i, t in zip(picks, ts)]
        if actions:
            for event, a in zip(history, rng.integers(0, len(actions), size=length)):
                event["actions"] = [actions[a]]
        bodies.append(json.dumps({"history": history, "k": k}).encode())
    return bodies


def dataset_bodies(checkpoint: Path, data_dir: str, n: int, k: int, seed: int) -> list[bytes]:
    """``n`` request bodies holding real users' test histories (all but each user's last item, the most recent
    max_len events, timestamps where the data has them) of the checkpoint's dataset, users drawn at random."""
    import yaml

    from genrec.config import DataConfig
    from genrec.data.dataset import prepare_data

    cfg = yaml.safe_load((checkpoint / "config.yaml").read_text())["data"]
    seqs = prepare_data(DataConfig(dataset=cfg["dataset"], data_dir=data_dir, max_len=cfg["max_len"])).sequences
    rng = np.random.default_rng(seed)
    bodies = []
    for u in rng.choice(seqs.num_users, size=n, replace=n > seqs.num_users):
        items = seqs.item_map.to_external(seqs.sequence(u)[:-1][-cfg["max_len"]:])
        times = seqs.times(u)[:-1][-cfg["max_len"]:]
        history = [{"item": i, "ts": int(t)} if seqs.has_time[u] else i for i, t in zip(items, times)]
        bodies.append(json.dumps({"history": history, "k": k}).encode())
    return bodies


class RawClient:
    """One keep-alive HTTP/1.1 connection: ``await post(path, body) -> (status, body)``; reconnects after a
    failure or a ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
            self.writer.write(head + body)
            await self.writer.drain()
            return await self._response()
        except BaseException:
            await self.close()
            raise

    async def _response(self) -> tuple[int, bytes]:
        assert self.reader is not None
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            await self.reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.reader = None, None


def _ok(status: int, body: bytes, two_stage: bool = False) -> bool:
    try:
        answer = json.loads(body)
        return status == 200 and len(answer["items"]) > 0 and (not two_stage or answer["stage"] == "two-stage")
    except (ValueError, KeyError, TypeError):
        return False


async def run_level(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    requests: int,
    max_seconds: float,
    client: str = "raw",
    two_stage: bool = False,
) -> dict:
    """``requests`` POSTs by ``concurrency`` callers (stopping early after ``max_seconds``) -> one result row."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    parsed = httpx.URL(url)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as shared:
        start = time.perf_counter()
        stop_at = start + max_seconds

        async def caller() -> None:
            nonlocal issued, errors
            raw = RawClient(parsed.host, parsed.port or 80)
            try:
                while issued < requests and time.perf_counter() < stop_at:
                    body = bodies[issued % len(bodies)]
                    issued += 1
                    t0 = time.perf_counter()
                    try:
                        if client == "raw":
                            ok = _ok(*await asyncio.wait_for(raw.post("/v1/recommend", body), 30.0), two_stage)
                        else:
                            r = await shared.post("/v1/recommend", content=body, headers=JSON_HEADERS)
                            ok = _ok(r.status_code, r.content, two_stage)
                    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                            ValueError, IndexError, httpx.HTTPError):  # fmt: skip
                        ok = False
                    latencies.append(time.perf_counter() - t0)
                    errors += not ok
            finally:
                await raw.close()

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000.0
    return {
        "_latencies_ms": ms,
        "_wall_s": wall,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": int(errors),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "rps": round(len(latencies) / wall, 1),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its live descendants (Linux /proc: the worker processes of
    ``--workers N``), 0.0 where unavailable."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, ValueError, IndexError):
        pass
    return total


def batch_stats(url: str) -> tuple[float, float]:
    """(forward passes, requests answered by them) so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    count = re.search(r"^genrec_batch_size_count (\S+)", text, re.M)
    total = re.search(r"^genrec_batch_size_sum (\S+)", text, re.M)
    return (float(count.group(1)) if count else 0.0), (float(total.group(1)) if total else 0.0)


def summarize(concurrency: int, rounds: list[dict]) -> dict:
    """One result row from the rounds of one level: latency percentiles over all their requests, req/s the median
    of the rounds (each round's is listed), errors summed."""
    ms = np.concatenate([r["_latencies_ms"] for r in rounds])
    return {
        "concurrency": concurrency,
        "requests": int(sum(r["requests"] for r in rounds)),
        "errors": int(sum(r["errors"] for r in rounds)),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "rps": round(float(np.median([r["rps"] for r in rounds])), 1),
        "rps_rounds": [r["rps"] for r in rounds],
        "mean_batch": round(float(np.mean([r["mean_batch"] for r in rounds])), 2),
        "server_cpu_ms_per_request": round(float(np.median([r["server_cpu_ms"] for r in rounds])), 2),
        "client_cpu_ms_per_request": round(float(np.median([r["client_cpu_ms"] for r in rounds])), 2),
    }


def markdown(rows: list[dict], mean_batch: dict[int, float], caption: str) -> str:
    lines = [caption, "", "| concurrency | requests | errors | p50 ms | p99 ms | req/s | requests per forward pass |",
             "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        mb = mean_batch.get(r["concurrency"])
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| {r['rps']:.0f} | {'' if mb is None else f'{mb:.1f}'} |")  # fmt: skip
    return "\n".join(lines)


def write_readme(table: str, two_stage: bool = False) -> None:
    if two_stage:
        write_between_markers(DOC, TWO_STAGE_START, TWO_STAGE_END, table)
    else:
        write_between_markers(DOC, TABLE_START, TABLE_END, table)


def row_path(row: dict) -> str:
    """The service path a result row measured (rows written before two-stage serving have none: retrieval)."""
    return str(row.get("path", "retrieval"))


def merge_rows(out: Path, rows: list[dict], path: str) -> list[dict]:
    """The rows already in ``out`` of the other paths, then ``rows`` (a run replaces the rows of its own path)."""
    kept: list[dict] = []
    if out.exists():
        previous = json.loads(out.read_text())
        if not isinstance(previous, list):
            raise ValueError(f"{out}: expected a JSON list of result rows")
        kept = [r for r in previous if row_path(r) != path]
    return kept + rows


def model_setup(directory: Path) -> dict:
    """What a result row records about a model directory: its name and config.yaml's model, data and train sections
    (without file locations, which belong to the machine, not to the model)."""
    import yaml

    config = yaml.safe_load((directory / "config.yaml").read_text())
    local = ("data_dir", "path", "timestamps_path", "output_dir", "device")
    sections = {key: {name: value for name, value in (config.get(key) or {}).items() if name not in local}
                for key in ("model", "data", "train")}  # fmt: skip
    try:
        shown = str(directory.resolve().relative_to(ROOT))
    except ValueError:
        shown = directory.name
    return {"dir": shown, **sections}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="model directory (run dir of genrec train)")
    p.add_argument("--ranker", type=Path, default=None,
                   help="ranking model directory: measure the two-stage service (genrec serve --ranker)")
    p.add_argument("--retrieve-k", type=int, default=200, help="with --ranker: items retrieved and re-ranked")
    p.add_argument("--task-weights", default=None, help="with --ranker: genrec serve --task-weights")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=1000, help="requests per concurrency level and round")
    p.add_argument("--rounds", type=int, default=3, help="times each level runs (interleaved); medians reported")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time cap per level")
    p.add_argument("--warmup", type=int, default=50, help="requests before measuring (not counted)")
    p.add_argument("--history-len", type=int, default=0, help="events per history (0 = the model's max_len)")
    p.add_argument("--histories", choices=["synthetic", "dataset"], default="synthetic",
                   help="synthetic: --history-len events drawn by popularity; dataset: real users' test histories")
    p.add_argument("--data-dir", default=None,
                   help="for --histories dataset (default: $GENREC_DATA_DIR, then the cache dir)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--server-threads", type=int, default=1, help="torch threads per server worker")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (genrec serve --workers)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--model-thread", action="store_true", help="server runs forward passes in a worker thread")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="HTTP client (see the docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-readme", action="store_true", help="do not write the table into docs/serving.md")
    args = p.parse_args()
    two_stage = args.ranker is not None
    path = "two-stage" if two_stage else "retrieval"
    if two_stage and args.histories == "dataset":
        p.error("--ranker takes synthetic histories (their events carry the ranker's actions)")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        health = wait_healthy(url, proc)
        length = args.history_len or int(health["max_len"])
        if args.histories == "dataset":
            bodies = dataset_bodies(args.checkpoint, args.data_dir, 1024, args.k, args.seed)
        else:
            actions = health["ranker"]["actions"] if two_stage else None
            bodies = request_bodies(args.checkpoint, 256, length, args.k, args.seed, actions)
        asyncio.run(run_level(url, bodies, 4, args.warmup, args.max_seconds, args.client, two_stage))
        runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
        for r in range(args.rounds):  # levels interleaved, round after round: drifts in machine speed hit every level
            for c in args.concurrency:
                passes0, answered0 = batch_stats(url)
                server0, client0 = cpu_seconds(proc.pid), time.process_time()
                row = asyncio.run(run_level(url, bodies, c, args.requests, args.max_seconds, args.client, two_stage))
                server1, client1 = cpu_seconds(proc.pid), time.process_time()
                passes1, answered1 = batch_stats(url)  # summed over the workers, up to date (genrec.serve.metrics)
                n = max(row["requests"], 1)
                row["mean_batch"] = (answered1 - answered0) / max(passes1 - passes0, 1.0)
                row["server_cpu_ms"] = 1000 * (server1 - server0) / n
                row["client_cpu_ms"] = 1000 * (client1 - client0) / n
                runs[c].append(row)
                print(f"round {r + 1}/{args.rounds}", json.dumps({k: v for k, v in row.items() if k[0] != "_"}),
                      flush=True)  # fmt: skip
    finally:
        stop_server(proc)
    rows = [summarize(c, runs[c]) for c in args.concurrency]
    mean_batch = {row["concurrency"]: row["mean_batch"] for row in rows}
    history_desc = (f"{length}-event timed histories" if args.histories == "synthetic"
                    else "real users' test histories (up to max_len events; timestamps where the data has them)")
    setup = {
        "path": path,
        "model_id": health["model_id"],
        "retriever": model_setup(args.checkpoint),
        "histories": history_desc + (", each event with one of the ranker's actions" if two_stage else ""),
        "k": args.k,
        "workers": args.workers,
        "server_threads": args.server_threads,
        "cpu_count": os.cpu_count(),
    }
    if two_stage:
        setup.update(retrieve_k=args.retrieve_k, ranker_model_id=health["ranker"]["model_id"],
                     ranker=model_setup(args.ranker), task_weights=health["ranker"]["task_weights"])  # fmt: skip
    rows = [{"path": path, **row, "setup": setup} for row in rows]
    lo, hi = args.concurrency[0], args.concurrency[-1]
    ratios = [b["rps"] / a["rps"] for a, b in zip(runs[lo], runs[hi])]
    ratio = float(np.median(ratios))
    print(f"throughput at concurrency {hi} / {lo}: median {ratio:.2f}x over {args.rounds} rounds "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merge_rows(args.out, rows, path), indent=2) + "\n")
    os.replace(tmp, args.out)
    served = f"`genrec serve` on {health['model_id']} ({health['num_items']:,} items)"
    if two_stage:
        served = (f"`genrec serve --ranker` (two-stage): {health['model_id']} retrieves the top {args.retrieve_k} of "
                  f"{health['num_items']:,} items, {health['ranker']['model_id']} re-ranks them "
                  f"(tasks {', '.join(health['ranker']['tasks'])})")  # fmt: skip
    caption = (
        f"{served}, POST /v1/recommend top-{args.k}, "
        f"{setup['histories']}, {args.client} HTTP/1.1 client, {os.cpu_count()} CPU cores shared by "
        f"client and server (server: {args.workers} worker process(es), {args.server_threads} torch thread(s) each, "
        f"max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
        f"{'model in a worker thread' if args.model_thread else 'model on the event loop'})."
    )
    caption += (f" Each level ran {args.rounds} times, levels interleaved; p50/p99 over all requests of a level, req/s "
                f"the median of its rounds. Throughput at concurrency {hi} / {lo}: **{ratio:.2f}x** (median of the "
                f"rounds' ratios: {', '.join(f'{x:.2f}' for x in ratios)}).")  # fmt: skip
    table = markdown(rows, mean_batch, caption)
    print("\n" + table)
    if not args.no_readme:
        write_readme(table, two_stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
