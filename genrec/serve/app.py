"""The HTTP service over a fitted ``genrec.api.Recommender`` (FastAPI; run by uvicorn through ``genrec serve``).

    POST /v1/recommend  {"history": [{"item": "1193", "ts": 978300760}, "661"], "k": 10,
                         "exclude_seen": true, "exclude": ["914"], "query_ts": null}
                        -> {"items": [{"item", "score", "title"}], "fallback", "unknown_items", "warnings", "model_id"}
    POST /v1/rank       {"history": [...], "candidates": ["914", "3408"], "query_ts": null}
                        -> {"scores": [{"item", "score", "title"}], "task", "unknown_items", "unknown_candidates", ...}
    GET  /healthz       model id, catalogue size, whether the popularity fallback is available
    GET  /metrics       Prometheus text: requests by path and status, latency histogram, batch-size histogram,
                        model info
    GET  /docs          OpenAPI (Swagger UI); the schema itself at /openapi.json

Request handling
    - History events are ``{"item": id, "ts": int | null}`` objects or bare ids (string or integer). Unknown items are
      ignored and listed in ``unknown_items`` and ``warnings``; a history with no known item (a new user) gets the
      popularity fallback, marked ``"fallback": "popularity"``; long histories keep their most recent items.
    - Bounds: k <= 1000, history <= 10,000 events, candidates and exclude <= 10,000 ids, ids <= 256 characters,
      |ts| <= 2**53, body <= ``max_body_bytes`` (413 beyond). Malformed JSON, wrong types, unknown fields and values
      out of bounds get 422 with the reason. No input produces a 5xx: 5xx means a bug (logged with its traceback,
      counted in /metrics) or, for 503, a full queue (overload, with Retry-After).
    - Concurrent requests are answered in micro-batches: requests wait in a queue, and a single model worker takes
      everything queued (up to ``max_batch``, after waiting ``max_wait_ms`` for company) into one forward pass. While
      it runs, new requests queue up, so batches grow with load without any waiting; the default wait is therefore 0
      (an asyncio sleep of 1 ms costs 1-2 ms of latency at low load and bought no throughput in bench/serve_load.py);
      the worker only yields to the event loop until requests already read from their sockets stop arriving.
      The forward pass runs on the event loop itself (requests arriving meanwhile wait in the socket buffers);
      ``model_thread=True`` (``genrec serve --model-thread``) runs it in a worker thread instead, which measured
      slower here because the two busy threads hand the GIL back and forth.
    - One process serves from one core. ``genrec serve --workers N`` runs N processes on the port
      (``genrec.serve.workers``), each with its own model, batcher and socket; /metrics sums all of them
      (``SharedMetrics``).

The app only reads the recommender; nothing is ever written to the model directory. Scores: see ``genrec.api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from typing_extensions import NotRequired, TypedDict  # pydantic's own dependency; typing's TypedDict before 3.12

from genrec import __version__
from genrec.api import (
    Events,
    MAX_ABS_TIMESTAMP,
    InvalidInputError,
    Query,
    Ranking,
    Recommendation,
    Recommender,
    Result,
)
from genrec.runtime import keep_freed_memory

log = logging.getLogger("genrec.serve")

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_CANDIDATES = 10_000
MAX_ID_CHARS = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 10,000-event history with timestamps is ~0.4 MB
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = ("/v1/recommend", "/v1/rank", "/healthz", "/metrics", "/docs", "/openapi.json")

# ----------------------------------------------------------------------------------------------------------------
# Request / response models (the bounds are part of the published OpenAPI schema)
# ----------------------------------------------------------------------------------------------------------------

ItemIdIn = Union[
    Annotated[str, StringConstraints(strict=True, max_length=MAX_ID_CHARS)],
    Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)],
]
Timestamp = Union[Annotated[int, Field(strict=True, ge=-MAX_ABS_TIMESTAMP, le=MAX_ABS_TIMESTAMP)], None]


# A TypedDict rather than a model: pydantic validates a 200-event history into plain dicts in less than half the time
# it takes to build 200 model instances (0.18 vs 0.39 ms per request, measured), a tenth of the server's CPU per
# request under load. (The docstring is the public schema's description.)
class Event(TypedDict):
    """One interaction: the raw item id and, optionally, its timestamp (the training data's unit)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    item: ItemIdIn
    ts: NotRequired[Timestamp]


HistoryIn = Annotated[list[Union[Event, ItemIdIn]], Field(max_length=MAX_HISTORY)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"history": [{"item": "1193", "ts": 978300760}, "661", "914"], "k": 10}]},
    )
    history: HistoryIn = Field(default_factory=list, description="oldest first; [] for a new user")
    k: Annotated[int, Field(strict=True, ge=1, le=MAX_K)] = 10
    exclude_seen: StrictBool = True
    exclude: Annotated[list[ItemIdIn], Field(max_length=MAX_CANDIDATES)] = Field(default_factory=list)
    query_ts: Timestamp = Field(None, description="request time for the time term; default: the last event's ts")


class RankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"history": ["1193", "661"], "candidates": ["914", "3408", "2355"]}]},
    )
    history: HistoryIn = Field(default_factory=list)
    candidates: Annotated[list[ItemIdIn], Field(max_length=MAX_CANDIDATES)]
    query_ts: Timestamp = None


class ScoredItem(BaseModel):
    item: str
    score: float | None = Field(description="null for an unknown candidate")
    title: str | None = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    fallback: str | None = Field(description='"popularity" when the history had no known item')
    unknown_items: list[str]
    warnings: list[str]
    model_id: str


class RankResponse(BaseModel):
    scores: list[ScoredItem] = Field(description="one per candidate, in the request's order")
    task: str = Field("next_item", description="the retrieval model's only task; rankers add per-task scores")
    fallback: str | None
    unknown_items: list[str]
    unknown_candidates: list[str]
    warnings: list[str]
    model_id: str


class HealthResponse(BaseModel):
    status: str
    model_id: str
    model: str
    num_items: int
    max_len: int
    popularity_fallback: bool
    version: str


# ----------------------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, written by hand: three metric families do not need a dependency)
# ----------------------------------------------------------------------------------------------------------------


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last = above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's counts (same bounds)."""
        self.counts = [a + int(b) for a, b in zip(self.counts, counts)]
        self.total += float(total)

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            running += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total!r}", f"{name}_count{braces} {running}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Request counts by (path, status), latency per path, model batch sizes, and the model's identity."""

    def __init__(self, info: dict[str, str]) -> None:
        self._lock = threading.Lock()
        self._info = info
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self._batches = _Histogram(tuple(float(b) for b in BATCH_BUCKETS))

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(path, status)] = self._requests.get((path, status), 0) + 1
            self._latency.setdefault(path, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batches.observe(float(size))

    def snapshot(self) -> dict[str, Any]:
        """This process's counts as plain JSON data (what a worker shares with the others)."""
        with self._lock:
            return {
                "requests": [[path, status, n] for (path, status), n in self._requests.items()],
                "latency": {path: [list(h.counts), h.total] for path, h in self._latency.items()},
                "batches": [list(self._batches.counts), self._batches.total],
            }

    def render(self, others: Sequence[dict[str, Any]] = ()) -> str:
        """Prometheus text of this process's counts plus ``others`` (snapshots of the other worker processes)."""
        requests: dict[tuple[str, int], int] = {}
        latency: dict[str, _Histogram] = {}
        batches = _Histogram(self._batches.bounds)
        for snap in [self.snapshot(), *others]:
            for path, status, n in snap["requests"]:
                requests[(path, int(status))] = requests.get((path, int(status)), 0) + int(n)
            for path, (counts, total) in snap["latency"].items():
                latency.setdefault(path, _Histogram(LATENCY_BUCKETS)).add(counts, total)
            batches.add(*snap["batches"])
        info = ",".join(f'{k}="{_label(v)}"' for k, v in self._info.items())
        lines = [
            "# HELP genrec_model_info The served model (value is always 1).",
            "# TYPE genrec_model_info gauge",
            f"genrec_model_info{{{info}}} 1",
            "# HELP genrec_requests_total HTTP requests by path and status code.",
            "# TYPE genrec_requests_total counter",
        ]
        for (path, status), n in sorted(requests.items()):
            lines.append(f'genrec_requests_total{{path="{_label(path)}",status="{status}"}} {n}')
        lines += [
            "# HELP genrec_request_duration_seconds Time from request start to response end, by path.",
            "# TYPE genrec_request_duration_seconds histogram",
        ]
        for path, hist in sorted(latency.items()):
            lines += hist.lines("genrec_request_duration_seconds", f'path="{_label(path)}"')
        lines += [
            "# HELP genrec_batch_size Requests answered by one forward pass of the model.",
            "# TYPE genrec_batch_size histogram",
        ]
        lines += batches.lines("genrec_batch_size", "")
        return "\n".join(lines) + "\n"


class SharedMetrics:
    """The metrics of several worker processes (``genrec serve --workers N``), each with its own ``Metrics``.

    Every ``interval_s`` each worker writes its snapshot to ``directory/<pid>.json`` (a temporary file, then a
    rename: readers never see a partial file), and its /metrics sums its live counts with the other workers' latest
    snapshots, so whichever worker answers the scrape reports the whole server, the others' counts at most
    ``interval_s`` old. Files of workers that exited stay: their requests still count. The directory belongs to the
    supervising ``genrec serve`` process (a fresh temporary directory, never the model directory)."""

    def __init__(self, directory: str | Path, metrics: Metrics, interval_s: float = 0.5) -> None:
        self.directory, self.metrics, self.interval_s = Path(directory), metrics, interval_s
        self.path = self.directory / f"{os.getpid()}.json"

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.metrics.snapshot()))
        os.replace(tmp, self.path)

    def others(self) -> list[dict[str, Any]]:
        snaps = []
        for path in sorted(self.directory.glob("*.json")):
            if path != self.path:
                try:
                    snaps.append(json.loads(path.read_text()))
                except (OSError, ValueError):  # a worker's file vanished with the directory: skip it
                    continue
        return snaps

    def render(self) -> str:
        return self.metrics.render(self.others())

    async def run(self) -> None:
        try:
            while True:
                self.write()
                await asyncio.sleep(self.interval_s)
        finally:
            with contextlib.suppress(OSError):
                self.write()  # the last counts, at shutdown


# ----------------------------------------------------------------------------------------------------------------
# Micro-batching
# ----------------------------------------------------------------------------------------------------------------

Q = TypeVar("Q")
R = TypeVar("R")


class Overloaded(Exception):
    """The request queue is full."""


class MicroBatcher(Generic[Q, R]):
    """Collects concurrent queries into batches for ``run``, called one batch at a time: on the event loop when
    ``inline``, else in one worker thread.

    The worker takes the first waiting query, waits ``max_wait_s`` for company, then takes everything queued (up to
    ``max_batch``). While a batch runs, later requests queue, so under load batches fill without any waiting. With
    ``max_wait_s`` 0 it still yields to the event loop until ``settle_yields`` yields in a row bring no new query:
    requests already read from their sockets then join this pass (measured at concurrency 32 with two workers: 15
    requests per pass instead of 7, 960 instead of 830 req/s) at no cost to a lone request."""

    def __init__(
        self,
        run: Callable[[list[Q]], list[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda n: None,
        inline: bool = False,
        settle_yields: int = 3,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self._run, self._on_batch, self.inline = run, on_batch, inline
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.settle_yields = settle_yields
        self._queue: asyncio.Queue | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        if not self.inline:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="genrec-model")
        self._task = asyncio.create_task(self._worker(), name="genrec-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, query: Q) -> R:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((query, future))
        except asyncio.QueueFull:
            raise Overloaded(f"more than {self.max_queue} requests waiting") from None
        return await future

    async def _collect(self) -> list[tuple[Q, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        if self.max_wait_s > 0 and self._queue.qsize() < self.max_batch - 1:
            await asyncio.sleep(self.max_wait_s)
        else:
            # Requests already read from their sockets are still on their way here (parsing, validation): yield to
            # the event loop while that brings more of them, so they join this pass instead of waiting for the
            # next one. Costs nothing when nothing else is ready (a lone request goes straight on).
            idle = 0
            while idle < self.settle_yields and self._queue.qsize() < self.max_batch - 1:
                before = self._queue.qsize()
                await asyncio.sleep(0)
                idle = idle + 1 if self._queue.qsize() == before else 0
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(q, f) for q, f in await self._collect() if not f.done()]  # skip cancelled (client gone)
            if not batch:
                continue
            self._on_batch(len(batch))
            try:
                if self.inline:  # on the event loop: no GIL hand-offs with a worker thread; the loop waits meanwhile
                    results = self._run([q for q, _ in batch])
                else:
                    results = await loop.run_in_executor(self._executor, self._run, [q for q, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # a bug: every request of the batch gets it (-> 500, logged)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


# ----------------------------------------------------------------------------------------------------------------
# ASGI middleware: body size limit and request metrics
# ----------------------------------------------------------------------------------------------------------------

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: bytes, headers: list | None = None):
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads the request body up front; more than ``max_bytes`` (declared or sent) -> 413.

    The rest of an oversized body is read and dropped (up to 16x the limit) so that the client, still sending,
    gets the 413 rather than a reset connection."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = bool(message.get("more_body", False))
            too_big = too_big or size > self.max_bytes
            if too_big:
                if size > 16 * self.max_bytes:
                    break
                continue
            chunks.append(body)
        if too_big:
            detail = f'{{"detail":"request body larger than {self.max_bytes} bytes"}}'.encode()
            await _send_json(send, 413, detail, [(b"connection", b"close")] if more else None)
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect

    return replay


class InternalErrorMiddleware:
    """An exception no handler took (a bug, never an input error): log it with its traceback and answer 500.

    Handled here rather than by an ``Exception`` handler, which Starlette re-raises to the server after
    answering, so that uvicorn drops the connection; here the connection stays usable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a clean answer; the server closes the connection
            await _send_json(send, 500, b'{"detail":"internal error"}')


class MetricsMiddleware:
    """Counts every HTTP request by path and status and observes its latency. A request that raised counts as 500;
    one whose client left before any response (nothing sent) counts as 499, nginx's "client closed request"."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            status = status or 500
            raise
        finally:
            path = scope.get("path", "")
            label = path if path in ROUTES else "other"
            self.metrics.observe_request(label, status or 499, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


def _history(events: list) -> Events:
    """Validated request events -> ``genrec.api.Events`` (the model's types are checked by pydantic already)."""
    return Events(
        [str(e["item"]) if isinstance(e, dict) else str(e) for e in events],
        [e.get("ts") if isinstance(e, dict) else None for e in events],
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """The reasons, without echoing the (possibly large) input back."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]  # fmt: skip


def create_app(
    recommender: Recommender,
    *,
    max_batch: int = 64,
    max_wait_ms: float = 0.0,
    max_queue: int = 1024,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_thread: bool = False,
    freeze_gc: bool = True,
    keep_memory: bool = True,
    metrics_dir: str | Path | None = None,
    workers: int = 1,
) -> FastAPI:
    """The FastAPI app serving a fitted ``recommender`` (see the module docstring).

    Args:
        max_batch: most requests answered by one forward pass.
        max_wait_ms: how long the model worker waits for more requests after the first one of a batch (0: it takes
            what is queued; under load that is already a full batch).
        max_queue: requests waiting beyond this get 503 (overload).
        max_body_bytes: larger request bodies get 413.
        model_thread: run forward passes in a worker thread, so the event loop keeps reading requests meanwhile.
            The default (False) runs them on the event loop: no GIL hand-offs between two busy threads, which
            measured ~25% less server CPU per request at concurrency 8 (bench/serve_load.py --model-thread).
        freeze_gc: at startup, ``gc.freeze()`` the objects alive then (torch, the model, the id maps: they live as
            long as the process), so that the collector's full passes stop walking them. This is process-wide:
            pass False when embedding the app in a process that must keep collecting those objects.
        keep_memory: at startup, ``genrec.runtime.keep_freed_memory()``: glibc's malloc keeps freed memory instead
            of handing it back to the kernel, so a forward pass's activations stop page-faulting at every batch
            (batches of 16: 0.64 instead of 0.80 ms per request, bench/serve_forward.py). Process-wide too.
        metrics_dir: set when this app is one of several worker processes (``genrec serve --workers N``, which
            passes a fresh temporary directory): /metrics then reports the sum over the workers (``SharedMetrics``).
        workers: the number of worker processes, for the ``genrec_model_info`` labels.
    """
    recommender.check_fitted()
    titles = {str(k): str(v) for k, v in (recommender.titles_ or {}).items()}
    model_id = recommender.model_id_
    config = recommender.config_
    info = {"model_id": model_id, "model": config.model.name, "num_items": str(len(recommender.item_map_))}
    metrics = Metrics({**info, "workers": str(workers)})
    shared = SharedMetrics(metrics_dir, metrics) if metrics_dir is not None else None
    batcher: MicroBatcher[Query, Result] = MicroBatcher(
        recommender.execute,
        max_batch=max_batch,
        max_wait_s=max_wait_ms / 1000.0,
        max_queue=max_queue,
        on_batch=metrics.observe_batch,
        inline=not model_thread,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Without this, each full (generation-2) collection walked those long-lived objects again and stalled the
        # event loop ~100 ms (17 times in a 3,000-request load test): that was the p99 tail.
        if freeze_gc:
            gc.collect()
            gc.freeze()
        if keep_memory:
            keep_freed_memory()
        await batcher.start()
        sharing = asyncio.create_task(shared.run(), name="genrec-metrics") if shared is not None else None
        n = len(recommender.item_map_)
        log.info("serving %s (%d items); max_batch=%d max_wait_ms=%s", model_id, n, max_batch, max_wait_ms)
        try:
            yield
        finally:
            if sharing is not None:
                sharing.cancel()
                await asyncio.gather(sharing, return_exceptions=True)
            await batcher.stop()

    app = FastAPI(
        title="genrec",
        version=__version__,
        summary="Next-item recommendations from an interaction history (HSTU / SASRec retrieval).",
        lifespan=lifespan,
    )
    app.add_middleware(InternalErrorMiddleware)  # innermost of ours: bugs become a logged 500, counted below
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees 413s too

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_errors(exc)}, status_code=422)

    @app.exception_handler(InvalidInputError)
    async def on_invalid_input(request: Request, exc: InvalidInputError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "invalid_input"}]}, status_code=422)

    @app.exception_handler(Overloaded)
    async def on_overload(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": f"overloaded: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    # Handlers return plain dicts; FastAPI validates them against response_model once (and documents it).
    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest) -> dict[str, Any]:
        """Top-k items after the history (seen items excluded unless ``exclude_seen`` is false)."""
        query = recommender.prepare_recommend(
            _history(body.history), body.k, body.exclude_seen, exclude=body.exclude, query_time=body.query_ts
        )
        result = await batcher.submit(query)
        assert isinstance(result, Recommendation)
        return {
            "items": [{"item": i, "score": s, "title": titles.get(i)} for i, s in zip(result.items, result.scores)],
            "fallback": result.fallback,
            "unknown_items": result.unknown,
            "warnings": result.warnings,
            "model_id": model_id,
        }

    @app.post("/v1/rank", response_model=RankResponse)
    async def rank(body: RankRequest) -> dict[str, Any]:
        """A score for each candidate (null for candidates unknown to the model), in the request's order."""
        query = recommender.prepare_rank(_history(body.history), body.candidates, query_time=body.query_ts)
        result = await batcher.submit(query)
        assert isinstance(result, Ranking)
        scored = zip(result.items, result.scores)
        return {
            "scores": [{"item": i, "score": _finite(s), "title": titles.get(i)} for i, s in scored],
            "fallback": result.fallback,
            "unknown_items": result.unknown,
            "unknown_candidates": result.unknown_candidates,
            "warnings": result.warnings,
            "model_id": model_id,
        }

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(
            status="ok",
            model_id=model_id,
            model=config.model.name,
            num_items=len(recommender.item_map_),
            max_len=config.data.max_len,
            popularity_fallback=recommender.popularity_ is not None,
            version=__version__,
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        text = shared.render() if shared is not None else metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ----------------------------------------------------------------------------------------------------------------
# Worker processes (genrec serve --workers N)
# ----------------------------------------------------------------------------------------------------------------

def app_from_settings(settings_json: str) -> FastAPI:
    """The app of one worker process of ``genrec serve --workers N`` (``genrec.serve.workers``): loads the model and
    builds the app from the JSON settings the supervisor passes
    (``{"checkpoint", "threads", "metrics_dir", "workers", "app": {create_app keyword arguments}}``)."""
    import torch

    settings = json.loads(settings_json)
    if settings.get("threads", 0) > 0:
        torch.set_num_threads(int(settings["threads"]))
    recommender = Recommender.load(settings["checkpoint"])
    return create_app(
        recommender, metrics_dir=settings["metrics_dir"], workers=int(settings["workers"]), **settings["app"]
    )
