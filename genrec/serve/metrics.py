"""Prometheus metrics of the HTTP service (``prometheus_client``), for one process or summed over worker processes.

    genrec_requests_total{path, status}           counter: HTTP requests by path and status code
    genrec_request_duration_seconds{path}         histogram: time from request start to response end
    genrec_batch_size                             histogram: requests answered by one forward pass of the model
    genrec_stage_duration_seconds{stage}          histogram, per request: the model time of each stage ("retrieve",
                                                  "rank") of the micro-batch pass that answered it
    genrec_model_info{model_id, model, num_items, workers}   gauge, always 1: the served model
    genrec_ranker_info{model_id, tasks}           gauge, always 1: the ranker (two-stage service only)

Paths are the service's routes; any other path counts as ``other`` (so that scanners cannot grow the label set).

One process (``genrec serve``): the metrics live in a registry of the app's own. Several worker processes
(``genrec serve --workers N``): ``prometheus_client``'s multiprocess mode. The supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before it starts the workers (the variable must be set before a
process imports ``prometheus_client``); each worker writes its values to memory-mapped files there, and whichever
worker answers /metrics sums every worker's files (``MultiProcessCollector``), so a scrape reports the whole server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROUTES = frozenset({"/v1/recommend", "/v1/rank", "/healthz", "/metrics", "/docs", "/redoc", "/openapi.json"})
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class ServiceMetrics:
    """Request counts by (path, status), latency per path, model batch sizes, and the model's identity.

    Args:
        info: the ``genrec_model_info`` labels.
        multiprocess_dir: the directory shared by the worker processes of ``genrec serve --workers N`` (also in
            ``$PROMETHEUS_MULTIPROC_DIR``, set before this process imported ``prometheus_client``); None for a
            single process.
        ranker_info: the ``genrec_ranker_info`` labels of a two-stage service; None: no such gauge.
    """

    def __init__(
        self,
        info: dict[str, str],
        multiprocess_dir: str | Path | None = None,
        ranker_info: dict[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        if multiprocess_dir is None:
            owner: CollectorRegistry | None = self.registry
        else:
            check_multiprocess_mode(multiprocess_dir)
            owner = None  # the values go to the shared files; scrapes read every worker's files
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
        self._requests = Counter(
            "genrec_requests", "HTTP requests by path and status code.", ["path", "status"], registry=owner
        )
        self._latency = Histogram(
            "genrec_request_duration_seconds",
            "Time from request start to response end, by path.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=owner,
        )
        self._batches = Histogram(
            "genrec_batch_size", "Requests answered by one forward pass of the model.", buckets=BATCH_BUCKETS,
            registry=owner,
        )  # fmt: skip
        self._stages = Histogram(
            "genrec_stage_duration_seconds",
            "Model time of each stage (retrieve, rank) of the pass that answered a request, per request.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=owner,
        )
        # livemax: one series for the server, not one per worker; a worker marked dead stops reporting it.
        model_info = Gauge(
            "genrec_model_info", "The served model (value is always 1).", list(info), registry=owner,
            multiprocess_mode="livemax",
        )  # fmt: skip
        model_info.labels(**info).set(1)
        if ranker_info is not None:
            ranker_gauge = Gauge(
                "genrec_ranker_info", "The ranker of the two-stage service (value is always 1).", list(ranker_info),
                registry=owner, multiprocess_mode="livemax",
            )  # fmt: skip
            ranker_gauge.labels(**ranker_info).set(1)
        self._stage_series = {stage: self._stages.labels(stage) for stage in ("retrieve", "rank")}
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}  # (route, status) -> (counter, histogram) children

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        key = (route_label(path), status)
        series = self._series.get(key)
        if series is None:  # bounded: the routes times the status codes the service answers
            series = self._series[key] = (self._requests.labels(key[0], str(status)), self._latency.labels(key[0]))
        series[0].inc()
        series[1].observe(seconds)

    def observe_batch(self, size: int) -> None:
        self._batches.observe(size)

    def observe_stage(self, stage: str, seconds: float, requests: int) -> None:
        """One stage of a micro-batch pass took ``seconds`` for ``requests`` requests: each request observes it."""
        series = self._stage_series[stage]
        for _ in range(requests):
            series.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE``) of this process, or of every worker process."""
        return generate_latest(self.registry)


def check_multiprocess_mode(directory: str | Path) -> None:
    """Refuse to count into nothing: multiprocess metrics need ``$PROMETHEUS_MULTIPROC_DIR`` to name ``directory``
    since before ``prometheus_client`` was imported (it picks where values live at import)."""
    if not Path(directory).is_dir():
        raise ValueError(f"metrics directory {directory} does not exist")
    env = os.environ.get(MULTIPROC_ENV)
    if env is None or Path(env).resolve() != Path(directory).resolve():
        raise ValueError(f"${MULTIPROC_ENV} is {env!r}, not the metrics directory {directory}")
    if _values.ValueClass is _values.MutexValue:
        raise ValueError(
            f"prometheus_client was imported before ${MULTIPROC_ENV} was set: this process's metrics would not be "
            "shared with the other workers"
        )


def mark_process_dead(pid: int, directory: str | Path) -> None:
    """The supervisor's bookkeeping for a worker that exited: its live gauges (``genrec_model_info``) go; its
    counts stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))
