"""An asyncio micro-batcher per model: batches up to `max_batch` images, waits at most `max_delay` to fill a batch
and only when other requests are already queued (never when idle), bounds its queue, drops requests past their
deadline before inference, and runs inference in a worker thread so the event loop stays free.

Admission comes before any work: a request takes a ticket (a place in the queue) before its body is read, so a full
queue refuses it for the price of a 429. Every accepted request is answered: on stop (requests waiting for a place
are refused with 503 at once, the running batches finish, then the queue runs for up to the drain timeout and what is
left is refused with 503), when the loop dies (500, and the batcher refuses what comes after), and by a bound on
every wait (504 after the deadline plus a grace)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import ServiceError

log = logging.getLogger("fpet.service")
ANSWER_GRACE_S = 10.0  # a request past its deadline may still be in a running batch; after this it gets a 504


def overloaded() -> ServiceError:
    return ServiceError(429, "overloaded", "the queue is full; retry shortly", {"Retry-After": "1"})


@dataclass
class Result:
    logits: np.ndarray
    queue_seconds: float
    inference_seconds: float  # the whole batch's
    batch_size: int


@dataclass(eq=False)  # compared and hashed by identity: items are tracked in a set while they run
class _Item:
    image: np.ndarray
    deadline: float
    future: asyncio.Future
    task: int | None = None  # multi-task models: the image's task index
    enqueued: float = field(default_factory=time.perf_counter)


class Ticket:
    """One admitted request's place in the queue, held from admission until its images are queued (or it fails)."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher, self._held = batcher, True

    @property
    def batcher(self) -> MicroBatcher:
        """Where the request's images go: the batcher that admitted it, even if a newer version has been swapped in
        since (model control), so that what it was preprocessed for is what runs it."""
        return self._batcher

    def release(self) -> None:
        """Give the place back (the request failed before queueing, or it is done): a waiting request gets it."""
        if self.consume():
            self._batcher._hand_over()

    def consume(self) -> bool:
        """The request's images take the place in the queue itself; True if the ticket still held it."""
        held, self._held = self._held, False
        if held:
            self._batcher._reserved -= 1
        return held


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[..., np.ndarray],  # (images) or, for multi-task items, (images, task indices)
        executor: Executor,
        *,
        max_batch: int,
        max_delay: float,
        max_queue: int,
        instances: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        answer_grace: float = ANSWER_GRACE_S,
        device: asyncio.Semaphore | None = None,
    ):
        self.run_batch, self.executor, self.answer_grace = run_batch, executor, answer_grace
        self.max_batch, self.max_delay, self.max_queue = max_batch, max_delay, max_queue
        self.instances = instances  # batches run side by side; the executor needs as many workers
        # Shared by every model on one device: a batch computes only while it holds a slot, and its time is counted
        # from then, so a model's batch seconds are its own, not those of the other models' batches beside it.
        self.device = device or asyncio.Semaphore(instances)
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_queue = on_queue or (lambda depth: None)
        self.on_failure = on_failure or (lambda reason: None)
        self._queue: deque[_Item] = deque()
        self._running: set[_Item] = set()  # taken from the queue, not yet answered: stop() answers them
        self._reserved = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.failure: str | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._running and not self._reserved

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._task.add_done_callback(self._ended)

    @property
    def _full(self) -> bool:
        return len(self._queue) + self._reserved >= self.max_queue

    async def admit(self, wait: float = 0.0) -> Ticket:
        """A place in the queue for one request, before anything about the request is read. When the queue is full
        the request waits up to `wait` seconds, in line, for a place (up to `max_queue` requests wait; waiting costs
        no CPU), then gets a 429: refusing at once would let a client that retries without pause spin the event
        loop, taking the CPU that inference needs."""
        self._check_open()
        if not self._full and not self._waiters:
            self._reserved += 1
            return Ticket(self)
        if wait <= 0 or len(self._waiters) >= self.max_queue:
            raise overloaded()
        place: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiters.append(place)
        try:
            return await asyncio.wait_for(place, wait)
        except BaseException as exc:
            if place in self._waiters:
                self._waiters.remove(place)
            elif place.done() and not place.cancelled() and place.exception() is None:
                place.result().release()  # a place came as the wait ended (timeout or cancel): pass it on
            if isinstance(exc, TimeoutError):
                raise overloaded() from None
            raise

    def _hand_over(self) -> None:
        """Give freed places to the requests waiting for one, first come first served: one wakes per place (none
        once closing: they were refused)."""
        while self._waiters and not self._full and not self._closing:
            place = self._waiters.popleft()
            if not place.done():
                self._reserved += 1
                place.set_result(Ticket(self))

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, run what is queued for up to `timeout`, then answer whatever is left with a 503."""
        closed = ServiceError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        self._closing = True
        self._refuse_waiters(closed)  # they hold no place: nothing of theirs was read yet
        self._arrived.set()
        if self._task is not None and not self._task.done():
            # asyncio.wait, not wait_for: a loop that dies (and cancels itself) meanwhile must not raise into stop()
            finished, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not finished:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(closed)

    async def retire(self, timeout: float = 30.0, poll: float = 0.01) -> None:
        """Stop once every request it admitted is answered: a version swapped out of service (model control) gets no
        new requests, but those it holds (queued, running, holding or waiting for a place) finish on it."""
        end = time.perf_counter() + timeout
        while not (self.idle and not self._waiters) and time.perf_counter() < end and self.failure is None:
            await asyncio.sleep(poll)
        await self.stop(max(end - time.perf_counter(), 0.0))

    async def submit(
        self, images: list[np.ndarray], deadline: float, ticket: Ticket | None = None, task: int | None = None
    ) -> list[Result]:
        """Queue a request's images; with `task` (multi-task models) they join batches of any task, and the runner
        is called with each image's task index as well."""
        held = ticket is not None and ticket.consume()
        try:
            self._check_open()
            if len(self._queue) + self._reserved + len(images) > self.max_queue:
                raise overloaded()
        except ServiceError:
            if held:
                self._hand_over()  # the place the ticket held is free again
            raise
        loop = asyncio.get_running_loop()
        items = [_Item(image, deadline, loop.create_future(), task) for image in images]
        self._queue.extend(items)
        self.on_queue(len(self._queue))
        self._arrived.set()
        wait = max(deadline - time.perf_counter(), 0.0) + self.answer_grace
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(item.future for item in items)), wait))
        except TimeoutError:
            raise ServiceError(504, "timeout", "no answer from the model within the request's deadline") from None

    def _check_open(self) -> None:
        if self.failure is not None:
            raise ServiceError(503, "not_ready", f"not ready: {self.failure}", {"Retry-After": "5"})
        if self._closing:
            raise ServiceError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})

    def _fail_all(self, error: ServiceError) -> None:
        for item in [*self._running, *self._queue]:
            if not item.future.done():
                item.future.set_exception(error)
        self._queue.clear()
        self._running.clear()
        self.on_queue(0)
        self._refuse_waiters(error)

    def _refuse_waiters(self, error: ServiceError) -> None:
        """Requests waiting for a place hear that the batcher is closed or failed."""
        for place in self._waiters:
            if not place.done():
                place.set_exception(error)
        self._waiters.clear()

    def _ended(self, task: asyncio.Task) -> None:
        """The loop returned: on stop, as it should; otherwise it died, and everything waiting on it must hear so."""
        if task.cancelled() or (self._closing and task.exception() is None):
            return
        self._die(task.exception())

    def _die(self, exc: BaseException | None) -> None:
        if self.failure is not None:
            return
        self.failure = f"the batcher stopped: {exc!r}"
        log.error("%s", self.failure, exc_info=exc)
        self._fail_all(ServiceError(500, "internal_error", self.failure))
        self.on_failure(self.failure)
        if self._task is not None:
            self._task.cancel()

    async def _take_batch(self) -> list[_Item]:
        while not self._queue:
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.popleft()]
        self._running.add(batch[0])
        under_load = bool(self._queue)  # an image arriving alone on an idle batcher goes at once
        end = time.perf_counter() + self.max_delay
        while len(batch) < self.max_batch:
            if self._queue:
                batch.append(self._queue.popleft())
                self._running.add(batch[-1])
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
        self._hand_over()
        return batch

    async def _loop(self) -> None:
        """A batch is formed when an instance is free (as late as possible, so it is as full as it can be); with
        several instances, batches run side by side. On stop, the running batches finish before the loop returns."""
        free = asyncio.Semaphore(self.instances)
        running: set[asyncio.Task] = set()

        def done(task: asyncio.Task) -> None:
            running.discard(task)
            free.release()

        try:
            while True:
                await free.acquire()
                batch = await self._take_batch()
                if not batch:
                    break  # closing, and nothing left to start
                task = asyncio.get_running_loop().create_task(self._run(batch))
                running.add(task)
                task.add_done_callback(done)
            await asyncio.gather(*running)
        except asyncio.CancelledError:
            for task in running:  # their items stay in _running, where stop() answers them
                task.cancel()
            raise

    def _top_up(self, room: int) -> list[_Item]:
        """Queued images (still within their deadline) for a batch about to run."""
        taken = []
        while self._queue and len(taken) < room:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if time.perf_counter() > item.deadline:
                item.future.set_exception(ServiceError(504, "timeout", "the request's deadline passed in the queue"))
                continue
            self._running.add(item)
            taken.append(item)
        self.on_queue(len(self._queue))
        self._hand_over()
        return taken

    async def _run(self, batch: list[_Item]) -> None:
        """One batch through the model; a failed inference fails its requests, anything else stops the batcher."""
        try:
            now = time.perf_counter()
            live = []
            for item in batch:
                if item.future.done():
                    self._running.discard(item)
                elif now > item.deadline:
                    self._running.discard(item)
                    item.future.set_exception(
                        ServiceError(504, "timeout", "the request's deadline passed in the queue")
                    )
                else:
                    live.append(item)
            if not live:
                return
            try:
                async with self.device:
                    if len(live) < self.max_batch and self._queue:  # what arrived while the device was busy joins
                        live.extend(self._top_up(self.max_batch - len(live)))
                    inputs = [np.stack([i.image for i in live])]
                    if live[0].task is not None:
                        inputs.append(np.array([i.task for i in live], dtype=np.int64))
                    start = time.perf_counter()
                    logits = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, *inputs)
                    seconds = time.perf_counter() - start
            except Exception as exc:
                self._running.difference_update(live)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            self.on_batch(len(live), seconds)
            for item, row in zip(live, logits, strict=True):
                if not item.future.done():
                    item.future.set_result(Result(row, start - item.enqueued, seconds, len(live)))
            self._running.difference_update(live)
        except Exception as exc:  # a bug here must not leave the batch unanswered: _die answers it
            self._die(exc)
