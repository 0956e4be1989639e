"""Micro-batching: concurrent requests answered by shared forward passes of the model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

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
