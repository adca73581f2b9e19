"""An asyncio micro-batcher per model: batches up to `max_batch` images, waits at most `max_delay` to fill a batch
and only when other requests are already queued (never when idle), bounds its queue, drops requests past their
deadline before inference, and runs inference in a worker thread so the event loop stays free."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceError


@dataclass
class Result:
    logits: np.ndarray
    queue_seconds: float
    inference_seconds: float  # the whole batch's
    batch_size: int


@dataclass
class _Item:
    image: np.ndarray
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        executor: Executor,
        *,
        max_batch: int,
        max_delay: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ):
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_delay, self.max_queue = max_batch, max_delay, max_queue
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_queue = on_queue or (lambda depth: None)
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._busy = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(ServiceError(503, "shutting_down", "the server is shutting down"))
        self._queue.clear()

    async def submit(self, images: list[np.ndarray], deadline: float) -> list[Result]:
        if len(self._queue) + len(images) > self.max_queue:
            raise ServiceError(429, "overloaded", "the queue is full; retry shortly", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        items = [_Item(image, deadline, loop.create_future()) for image in images]
        self._queue.extend(items)
        self.on_queue(len(self._queue))
        self._arrived.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _take_batch(self) -> list[_Item]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.popleft()]
        under_load = bool(self._queue)  # an image arriving alone on an idle batcher goes at once
        end = time.perf_counter() + self.max_delay
        while len(batch) < self.max_batch:
            if self._queue:
                batch.append(self._queue.popleft())
                continue
            remaining = end - time.perf_counter()
            if not under_load or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        self.on_queue(len(self._queue))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take_batch()
            now = time.perf_counter()
            live = []
            for item in batch:
                if item.future.done():
                    continue
                if now > item.deadline:
                    item.future.set_exception(
                        ServiceError(504, "timeout", "the request's deadline passed in the queue")
                    )
                else:
                    live.append(item)
            if not live:
                continue
            self._busy = True
            start = time.perf_counter()
            try:
                logits = await loop.run_in_executor(self.executor, self.run_batch, np.stack([i.image for i in live]))
            except Exception as exc:  # a failed batch fails its requests, never the loop
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            seconds = time.perf_counter() - start
            self.on_batch(len(live), seconds)
            for item, row in zip(live, logits, strict=True):
                if not item.future.done():
                    item.future.set_result(Result(row, start - item.enqueued, seconds, len(live)))
