"""The HTTP service over a fitted ``genrec.api.Recommender`` (FastAPI; run by uvicorn through ``genrec serve``).

    POST /v1/recommend  {"history": [{"item": "1193", "ts": 978300760}, "661"], "k": 10,
                         "exclude_seen": true, "exclude": ["914"], "query_ts": null}
                        -> {"items": [{"item", "score", "title"}], "fallback", "unknown_items", "warnings", "model_id"}
    POST /v1/rank       {"history": [...], "candidates": ["914", "3408"], "query_ts": null}
                        -> {"scores": [{"item", "score", "title"}], "task", "unknown_items", "unknown_candidates", ...}
    GET  /healthz       model id, catalogue size, whether the popularity fallback is available
    GET  /metrics       Prometheus text: requests by path and status, latency histogram, batch-size histogram,
                        model info (``genrec.serve.metrics``)
    GET  /docs          Swagger UI (ReDoc at /redoc), served with its assets from the package: no CDN, works
                        offline; the schema itself at /openapi.json

Request handling
    - History events are ``{"item": id, "ts": int | null}`` objects or bare ids (string or integer). Unknown items are
      ignored and listed in ``unknown_items`` and ``warnings``; a history with no known item (a new user) gets the
      popularity fallback, marked ``"fallback": "popularity"``; long histories keep their most recent items.
    - Bounds: k <= 1000, history <= 10,000 events, candidates and exclude <= 10,000 ids, ids <= 256 characters,
      |ts| <= 2**53, body <= ``max_body_bytes``.
    - Status codes (every 4xx and 5xx body is JSON ``{"detail": "<reason>"}``):
        400  the body is not JSON: empty, not UTF-8, a syntax error, or nested too deeply
        413  the body is larger than ``max_body_bytes``
        415  the Content-Type is not ``application/json`` (a charset, if given, must be utf-8)
        422  JSON that does not match the schema; ``detail`` names each field's path (``history[3]: ...``) and
             ``errors`` lists them as ``{"loc", "msg", "type"}``
        503  the request queue is full (overload; with ``Retry-After``)
        500  a bug (logged with its traceback, counted in /metrics): no input produces a 5xx other than 503
      404 and 405 (unknown path, wrong method) have the same body.
    - Concurrent requests are answered in micro-batches (``genrec.serve.batching``): requests wait in a queue, and a
      single model worker takes everything queued (up to ``max_batch``, after waiting ``max_wait_ms`` for company)
      into one forward pass. While it runs, new requests queue up, so batches grow with load without any waiting;
      the default wait is therefore 0 (an asyncio sleep of 1 ms costs 1-2 ms of latency at low load and bought no
      throughput in bench/serve_load.py); the worker only yields to the event loop until requests already read
      from their sockets stop arriving. The forward pass runs on the event loop itself (requests arriving
      meanwhile wait in the socket buffers); ``model_thread=True`` (``genrec serve --model-thread``) runs it in a
      worker thread instead, which measured slower here because the two busy threads hand the GIL back and forth.
    - One process serves from one core. ``genrec serve --workers N`` runs N processes on the port
      (``genrec.serve.workers``), each with its own model, batcher and socket; /metrics sums all of them.

Two-stage service (``create_app(recommender, ranker=...)``, ``genrec serve --ranker DIR``; ``genrec.serve.two_stage``)
    POST /v1/recommend  as above, plus "retrieve_k" (default: the server's), "task_weights" ({task: weight}, merged
                        over the server's), "user_features" ({name: value}); events may carry "actions" (the ranker's
                        action names). The retriever's top retrieve_k (same exclusions and fallback), re-ranked by
                        Σ_t w_t·p_t of the ranker's probabilities -> {"items": [{"item", "score", "retrieval_score",
                        "probs", "title"}], "stage": "two-stage", "tasks", "task_weights", "retrieve_k",
                        "retrieved", "fallback", "unknown_items", "ranker_unknown_items", "warnings", "model_id",
                        "ranker_model_id"}
    POST /v1/rank       {"history", "candidates", "query_ts", "task_weights", "user_features"} -> the ranker's
                        {"items": [{"item", "probs": {task: p}, "score", "title"}], "tasks", "task_weights",
                        "unknown_items", "unknown_candidates", "warnings", "model_id"}
    GET  /healthz       also "stage": "two-stage" and "ranker": {model_id, tasks, task_weights, retrieve_k, ...}
    An unknown task in task_weights, k > retrieve_k, an unknown action name or user feature: 422 (checked when the
    request arrives, by ``Ranker.prepare_rank``). Both routes share one micro-batcher: a pass runs the retriever over
    every recommend request's history, then the ranker once over every request. /metrics times each stage
    (``genrec_stage_duration_seconds``).

The app only reads the models; nothing is ever written to the model directories. Scores: see ``genrec.api`` and
``genrec.ranking_api``.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from genrec import __version__
from genrec.api import InvalidInputError, Ranking, Recommendation, Recommender
from genrec.runtime import keep_freed_memory
from genrec.serve.batching import MicroBatcher, Overloaded
from genrec.serve.metrics import CONTENT_TYPE, ServiceMetrics
from genrec.serve.middleware import BodyLimitMiddleware, InternalErrorMiddleware, MetricsMiddleware
from genrec.serve.schemas import (
    MAX_RETRIEVE_K,
    BodyError,
    ErrorResponse,
    HealthResponse,
    RankerHealth,
    RankRequest,
    RankResponse,
    RecommendRequest,
    RecommendResponse,
    TwoStageHealthResponse,
    TwoStageRankRequest,
    TwoStageRankResponse,
    TwoStageRecommendRequest,
    TwoStageRecommendResponse,
    ValidationErrorResponse,
    describe_errors,
    parse_body,
    to_events,
)
from genrec.serve.two_stage import DEFAULT_RETRIEVE_K, RankOnlyResult, RetrieveRankResult, TwoStage

if TYPE_CHECKING:
    from genrec.ranking_api import Ranker

log = logging.getLogger("genrec.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 10,000-event history with timestamps is ~0.4 MB
DOCS_ASSETS = "/docs/static"  # Swagger UI and ReDoc scripts, styles and icon, from the fastapi-offline package

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not JSON (empty, not UTF-8, syntax, nested too deeply)"},
    413: {"model": ErrorResponse, "description": "the body is larger than the server's limit"},
    415: {"model": ErrorResponse, "description": "the Content-Type is not application/json"},
    422: {"model": ValidationErrorResponse, "description": "JSON that does not match the schema (field paths)"},
    503: {"model": ErrorResponse, "description": "the request queue is full; retry after Retry-After seconds"},
}


def _json_body(model: type) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that parses ``model`` itself (``parse_body``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _document_request_bodies(app: FastAPI, models: tuple[type, ...]) -> None:
    """Adds the request models (and the types they use) to the OpenAPI components that ``_json_body`` refers to."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _, top = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(top.get("$defs", {}))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def _probs(probs: dict[str, list[float]], i: int) -> dict[str, float | None]:
    return {task: _finite(p[i]) for task, p in probs.items()}


def _timed(run: Callable[[list], list], observe: Callable[[str, float, int], None], stage: str) -> Callable:
    """``run`` (a micro-batch's model call) that reports its duration to ``observe(stage, seconds, requests)``."""

    def timed(queries: list) -> list:
        start = time.perf_counter()
        results = run(queries)
        observe(stage, time.perf_counter() - start, len(queries))
        return results

    return timed


def create_app(
    recommender: Recommender,
    *,
    ranker: Ranker | None = None,
    retrieve_k: int = DEFAULT_RETRIEVE_K,
    task_weights: dict[str, float] | None = None,
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
    """The FastAPI app serving a fitted ``recommender``, alone or followed by a ``ranker`` (see the module docstring).

    Args:
        ranker: a loaded ``genrec.ranking_api.Ranker``: /v1/recommend re-ranks the retrieved items with it and
            /v1/rank answers its per-task probabilities. None: the retrieval service.
        retrieve_k: with a ranker, items retrieved per request (a request's ``retrieve_k`` overrides it).
        task_weights: with a ranker, each task's weight in the combined score (tasks not named: 1).
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
        metrics_dir: set when this app is one of several worker processes (``genrec serve --workers N``): the
            directory in ``$PROMETHEUS_MULTIPROC_DIR`` where every worker writes its metrics; /metrics then
            reports the sum over the workers (``genrec.serve.metrics``).
        workers: the number of worker processes, for the ``genrec_model_info`` labels.
    """
    recommender.check_fitted()
    if ranker is None and (retrieve_k != DEFAULT_RETRIEVE_K or task_weights):
        raise ValueError("retrieve_k and task_weights apply to a two-stage service: pass a ranker")
    titles = {str(k): str(v) for k, v in (recommender.titles_ or {}).items()}
    model_id = recommender.model_id_
    config = recommender.config_
    info = {"model_id": model_id, "model": config.model.name, "num_items": str(len(recommender.item_map_))}
    ranker_info = None if ranker is None else {"model_id": ranker.model_id, "tasks": ",".join(ranker.tasks)}
    metrics = ServiceMetrics({**info, "workers": str(workers)}, multiprocess_dir=metrics_dir, ranker_info=ranker_info)
    stages = None
    if ranker is not None:
        stages = TwoStage(recommender, ranker, retrieve_k=retrieve_k, task_weights=task_weights,
                          on_stage=metrics.observe_stage)  # fmt: skip
        run = stages.execute
    else:
        run = _timed(recommender.execute, metrics.observe_stage, "retrieve")
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        run,
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
        n = len(recommender.item_map_)
        log.info("serving %s (%d items); max_batch=%d max_wait_ms=%s", model_id, n, max_batch, max_wait_ms)
        if stages is not None:
            weights = ", ".join(f"{t}={w:g}" for t, w in stages.task_weights.items())
            log.info("re-ranking the top %d with %s (tasks %s)", stages.retrieve_k, stages.ranker.model_id, weights)
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPIOffline(
        title="genrec",
        version=__version__,
        summary="Next-item recommendations from an interaction history (HSTU / SASRec retrieval"
        + (", re-ranked by a multi-task ranker)." if ranker is not None else ")."),
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
    )
    app.add_middleware(InternalErrorMiddleware)  # innermost of ours: bugs become a logged 500, counted below
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees 413s too
    if stages is None:
        _document_request_bodies(app, (RecommendRequest, RankRequest))
    else:
        _document_request_bodies(app, (TwoStageRecommendRequest, TwoStageRankRequest))

    @app.exception_handler(BodyError)
    async def on_body_error(request: Request, exc: BodyError) -> JSONResponse:
        return _error(exc.status, exc.detail, **({"errors": exc.errors} if exc.errors is not None else {}))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = describe_errors(list(exc.errors()), where=())  # paths start with "query", "path", ...
        return _error(422, detail, errors=errors)

    @app.exception_handler(InvalidInputError)
    async def on_invalid_input(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error(422, str(exc), errors=[{"loc": ["body"], "msg": str(exc), "type": "invalid_input"}])

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)  # 404, 405: {"detail": "Not Found"}

    @app.exception_handler(Overloaded)
    async def on_overload(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, f"the server is overloaded ({exc}); retry later", headers={"Retry-After": "1"})

    # Handlers return plain dicts; FastAPI validates them against response_model once (and documents it).
    if stages is None:
        _retrieval_routes(app, recommender, batcher, titles, model_id)
    else:
        _two_stage_routes(app, stages, batcher, titles, model_id)

    health = {
        "status": "ok",
        "model_id": model_id,
        "model": config.model.name,
        "num_items": len(recommender.item_map_),
        "max_len": config.data.max_len,
        "popularity_fallback": recommender.popularity_ is not None,
        "version": __version__,
    }
    if stages is None:

        @app.get("/healthz", response_model=HealthResponse)
        async def healthz() -> HealthResponse:
            return HealthResponse(**health)

    else:
        ranker_health = RankerHealth(
            model_id=stages.ranker.model_id,
            tasks=list(stages.tasks),
            actions=list(stages.ranker.state_.schema.actions),
            task_weights=stages.task_weights,
            retrieve_k=stages.retrieve_k,
            max_retrieve_k=MAX_RETRIEVE_K,
        )

        @app.get("/healthz", response_model=TwoStageHealthResponse)
        async def healthz_two_stage() -> TwoStageHealthResponse:
            return TwoStageHealthResponse(**health, ranker=ranker_health)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _retrieval_routes(
    app: FastAPI, recommender: Recommender, batcher: MicroBatcher, titles: dict[str, str], model_id: str
) -> None:
    """/v1/recommend and /v1/rank of the retrieval service."""

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=_ERRORS,
              openapi_extra=_json_body(RecommendRequest))  # fmt: skip
    async def recommend(request: Request) -> dict[str, Any]:
        """Top-k items after the history (seen items excluded unless ``exclude_seen`` is false)."""
        body = parse_body(RecommendRequest, request.headers.get("content-type"), await request.body())
        query = recommender.prepare_recommend(
            to_events(body.history), body.k, body.exclude_seen, exclude=body.exclude, query_time=body.query_ts
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

    @app.post("/v1/rank", response_model=RankResponse, responses=_ERRORS, openapi_extra=_json_body(RankRequest))
    async def rank(request: Request) -> dict[str, Any]:
        """A score for each candidate (null for candidates unknown to the model), in the request's order."""
        body = parse_body(RankRequest, request.headers.get("content-type"), await request.body())
        query = recommender.prepare_rank(to_events(body.history), body.candidates, query_time=body.query_ts)
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


def _two_stage_routes(
    app: FastAPI, stages: TwoStage, batcher: MicroBatcher, titles: dict[str, str], model_id: str
) -> None:
    """/v1/recommend (retrieve, then re-rank) and /v1/rank (the ranker's probabilities) of the two-stage service."""
    ranker_id = stages.ranker.model_id
    tasks = list(stages.tasks)

    @app.post("/v1/recommend", response_model=TwoStageRecommendResponse, responses=_ERRORS,
              openapi_extra=_json_body(TwoStageRecommendRequest))  # fmt: skip
    async def recommend(request: Request) -> dict[str, Any]:
        """The retriever's top ``retrieve_k`` (seen items excluded unless ``exclude_seen`` is false), re-ranked by
        the combined score Σ_t w_t·p_t of the ranker's probabilities: the top k, best first."""
        body = parse_body(TwoStageRecommendRequest, request.headers.get("content-type"), await request.body())
        query = stages.prepare_recommend(
            to_events(body.history), body.history, k=body.k, retrieve_k=body.retrieve_k,
            exclude_seen=body.exclude_seen, exclude=body.exclude, query_time=body.query_ts,
            task_weights=body.task_weights, user_features=body.user_features,
        )  # fmt: skip
        result = await batcher.submit(query)
        assert isinstance(result, RetrieveRankResult)
        retrieval, ranked = result.recommendation, result.ranked
        scored = zip(result.items, result.scores, result.retrieval_scores)
        items = [{"item": item, "score": _finite(score), "retrieval_score": retrieval_score,
                  "probs": _probs(result.probs, i), "title": titles.get(item)}
                 for i, (item, score, retrieval_score) in enumerate(scored)]  # fmt: skip
        return {
            "items": items,
            "stage": "two-stage",
            "tasks": tasks,
            "task_weights": query.weights,
            "retrieve_k": query.retrieval.k,
            "retrieved": result.retrieved,
            "fallback": retrieval.fallback,
            "unknown_items": retrieval.unknown,
            "ranker_unknown_items": list(ranked.unknown),
            "warnings": retrieval.warnings + [w for w in ranked.warnings if w not in retrieval.warnings],
            "model_id": model_id,
            "ranker_model_id": ranker_id,
        }

    @app.post("/v1/rank", response_model=TwoStageRankResponse, responses=_ERRORS,
              openapi_extra=_json_body(TwoStageRankRequest))  # fmt: skip
    async def rank(request: Request) -> dict[str, Any]:
        """The ranker's probability per task and the combined score for each candidate (null for candidates
        unknown to it), in the request's order."""
        body = parse_body(TwoStageRankRequest, request.headers.get("content-type"), await request.body())
        query = stages.prepare_rank(
            body.history, body.candidates, query_time=body.query_ts,
            task_weights=body.task_weights, user_features=body.user_features,
        )  # fmt: skip
        result = await batcher.submit(query)
        assert isinstance(result, RankOnlyResult)
        ranked = result.ranked
        return {
            "items": [{"item": item, "probs": _probs(ranked.probs, i), "score": _finite(result.scores[i]),
                       "title": titles.get(item)} for i, item in enumerate(ranked.items)],  # fmt: skip
            "tasks": tasks,
            "task_weights": query.weights,
            "unknown_items": list(ranked.unknown),
            "unknown_candidates": list(ranked.unknown_candidates),
            "warnings": list(ranked.warnings),
            "model_id": ranker_id,
        }


def app_from_settings(settings_json: str) -> FastAPI:
    """The app of one worker process of ``genrec serve --workers N`` (``genrec.serve.workers``): loads the model(s)
    and builds the app from the JSON settings the supervisor passes (``{"checkpoint", "ranker" (a directory or
    null), "threads", "metrics_dir", "workers", "app": {create_app keyword arguments}}``)."""
    import torch

    settings = json.loads(settings_json)
    if settings.get("threads", 0) > 0:
        torch.set_num_threads(int(settings["threads"]))
    recommender = Recommender.load(settings["checkpoint"])
    ranker = None
    if settings.get("ranker"):
        from genrec.ranking_api import Ranker

        ranker = Ranker.load(settings["ranker"])
    return create_app(
        recommender, ranker=ranker, metrics_dir=settings["metrics_dir"], workers=int(settings["workers"]),
        **settings["app"],
    )  # fmt: skip
