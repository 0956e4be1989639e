"""ASGI middleware of the HTTP service: the body size limit (413), internal errors (a logged 500), request metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

from genrec.serve.metrics import ServiceMetrics

log = logging.getLogger("genrec.serve")

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
            detail = json.dumps({"detail": f"the request body is larger than the limit of {self.max_bytes} bytes"})
            await _send_json(send, 413, detail.encode(), [(b"connection", b"close")] if more else None)
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

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
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
            self.metrics.observe_request(scope.get("path", ""), status or 499, time.perf_counter() - start)
