"""The micro-batcher with a fake runner: batching, delay, queue bound, deadlines."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import MicroBatcher, Ticket
from service.errors import ServiceError


class FakeRunner:
    def __init__(self, seconds: float = 0.0, fail: bool = False):
        self.seconds, self.fail, self.batches = seconds, fail, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("boom")
        return batch.reshape(len(batch), -1)[:, :2] * 2


def run(coro):
    return asyncio.run(coro)


async def with_batcher(runner, body, **kwargs):
    settings = {"max_batch": 4, "max_delay": 0.002, "max_queue": 16, **kwargs}
    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(runner, executor, **settings)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop()


def images(n):
    return [np.full((1, 2, 2), i, dtype=np.float32) for i in range(n)]


def test_results_come_back_in_order_and_in_batches():
    runner = FakeRunner(seconds=0.05)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5))
        await asyncio.sleep(0.01)  # the first batch is running: the next requests queue up
        rest = await asyncio.gather(*(batcher.submit([img], time.perf_counter() + 5) for img in images(6)))
        return await first, rest

    _, rest = run(with_batcher(runner, body))
    assert [float(r[0].logits[0]) for r in rest] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert runner.batches[0] == 1 and max(runner.batches) == 4  # later batches are full, up to max_batch
    assert sum(runner.batches) == 7
    assert {r[0].batch_size for r in rest} <= {2, 3, 4}


def test_an_idle_batcher_never_waits():
    runner = FakeRunner()

    async def body(batcher):
        start = time.perf_counter()
        await batcher.submit(images(1), start + 5)
        return time.perf_counter() - start

    assert run(with_batcher(runner, body, max_delay=1.0)) < 0.5  # a 1 s delay is never paid by a lone request


def test_under_load_it_waits_at_most_the_delay_to_fill_a_batch():
    runner = FakeRunner()

    async def body(batcher):
        start = time.perf_counter()
        await asyncio.gather(*(batcher.submit([img], start + 5) for img in images(2)))
        return time.perf_counter() - start

    elapsed = run(with_batcher(runner, body, max_delay=0.2))
    assert runner.batches == [2] and 0.15 < elapsed < 1.5


def test_a_full_queue_answers_429():
    runner = FakeRunner(seconds=0.2)

    async def body(batcher):
        running = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(images(3), time.perf_counter() + 5))
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as error:
            await batcher.submit(images(2), time.perf_counter() + 5)
        await asyncio.gather(running, queued)
        return error.value

    error = run(with_batcher(runner, body, max_queue=4))
    assert error.status == 429 and error.error_type == "overloaded" and error.headers["Retry-After"] == "1"


def test_requests_past_their_deadline_are_dropped_before_inference():
    runner = FakeRunner(seconds=0.1)

    async def body(batcher):
        slow = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5))
        await asyncio.sleep(0.02)
        with pytest.raises(ServiceError) as error:
            await batcher.submit(images(1), time.perf_counter() + 0.01)
        await slow
        return error.value

    error = run(with_batcher(runner, body))
    assert error.status == 504 and runner.batches == [1]  # the late image never reached the model


def test_a_failing_batch_fails_its_requests_not_the_batcher():
    runner = FakeRunner(fail=True)

    async def body(batcher):
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(images(2), time.perf_counter() + 5)
        runner.fail = False
        return await batcher.submit(images(1), time.perf_counter() + 5)

    assert len(run(with_batcher(runner, body))) == 1


def test_admission_holds_places_until_the_images_are_queued():
    runner = FakeRunner(seconds=0.2)

    async def body(batcher):
        tickets = [await batcher.admit() for _ in range(3)]
        with pytest.raises(ServiceError) as full:
            await batcher.admit()  # refused before the request was read: three places are taken
        tickets[0].release()
        tickets[0].release()  # releasing twice frees one place, not two
        again = await batcher.admit()
        with pytest.raises(ServiceError):
            await batcher.admit()
        results = await asyncio.gather(
            *(batcher.submit(images(1), time.perf_counter() + 5, t) for t in (tickets[1], tickets[2], again))
        )
        return full.value, results

    error, results = run(with_batcher(runner, body, max_queue=3, max_batch=1))
    assert error.status == 429 and error.headers["Retry-After"] == "1"
    assert len(results) == 3


def test_stop_answers_the_running_batch_and_the_queue():
    runner = FakeRunner(seconds=0.3)

    async def body(batcher):
        pending = [asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5)) for _ in range(4)]
        await asyncio.sleep(0.05)  # one image is running, three are queued
        start = time.perf_counter()
        await batcher.stop(timeout=0.1)
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        with pytest.raises(ServiceError) as late:
            await batcher.submit(images(1), time.perf_counter() + 5)
        return outcomes, time.perf_counter() - start, late.value

    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(runner, executor, max_batch=1, max_delay=0.0, max_queue=8)

        async def go():
            batcher.start()
            return await body(batcher)

        outcomes, seconds, late = run(go())
    assert seconds < 1.0 and all(isinstance(o, ServiceError) and o.status == 503 for o in outcomes), outcomes
    assert late.status == 503 and late.error_type == "shutting_down"


def test_a_dead_loop_fails_its_requests_flips_readiness_and_refuses_the_next():
    failures = []

    async def body(batcher):
        async def broken():
            raise RuntimeError("the loop broke")

        batcher._take_batch = broken
        batcher._task.cancel()  # restart the loop with the broken step
        await asyncio.gather(batcher._task, return_exceptions=True)
        batcher._task = asyncio.get_running_loop().create_task(batcher._loop())
        batcher._task.add_done_callback(batcher._ended)
        with pytest.raises(ServiceError) as first:
            await batcher.submit(images(1), time.perf_counter() + 5)
        with pytest.raises(ServiceError) as later:
            await batcher.admit()
        return first.value, later.value

    first, later = run(with_batcher(FakeRunner(), body, on_failure=failures.append))
    assert first.status == 500 and "the batcher stopped" in first.message and "the loop broke" in first.message
    assert later.status == 503 and "the batcher stopped" in later.message
    assert failures and "the loop broke" in failures[0]


def test_no_wait_outlives_the_deadline_and_its_grace():
    runner = FakeRunner(seconds=1.0)

    async def body(batcher):
        start = time.perf_counter()
        with pytest.raises(ServiceError) as error:
            await batcher.submit(images(1), start + 0.05)
        return error.value, time.perf_counter() - start

    error, seconds = run(with_batcher(runner, body, answer_grace=0.1))
    assert error.status == 504 and seconds < 0.6


def test_a_full_queue_lets_a_request_wait_for_a_place_then_refuses_it():
    runner = FakeRunner(seconds=0.3)

    async def body(batcher):
        running = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5))
        await asyncio.sleep(0.05)  # running; the queue (one place) is free
        queued = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5))
        await asyncio.sleep(0)
        start = time.perf_counter()
        ticket = await batcher.admit(wait=1.0)  # the queued image enters the next batch: a place frees up
        waited = time.perf_counter() - start
        with pytest.raises(ServiceError) as refused:
            await batcher.admit(wait=0.1)  # this one finds no place within its wait
        refused_after = time.perf_counter() - start - waited
        result = await batcher.submit(images(1), time.perf_counter() + 5, ticket)
        await asyncio.gather(running, queued)
        return waited, refused.value, refused_after, result

    waited, refused, refused_after, result = run(with_batcher(runner, body, max_queue=1, max_batch=1))
    assert 0.15 < waited < 0.6 and len(result) == 1
    assert refused.status == 429 and 0.09 < refused_after < 0.5


def test_no_more_requests_wait_than_the_queue_holds():
    async def body(batcher):
        held = [await batcher.admit() for _ in range(2)]  # the queue's two places
        waiters = [asyncio.ensure_future(batcher.admit(wait=0.5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        with pytest.raises(ServiceError) as extra:
            await batcher.admit(wait=0.5)  # two wait already, as many as the queue holds: refused at once
        quick = time.perf_counter() - start
        for ticket in held:
            ticket.release()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        return extra.value, quick, outcomes

    extra, quick, outcomes = run(with_batcher(FakeRunner(), body, max_queue=2))
    assert extra.status == 429 and quick < 0.05
    assert not [o for o in outcomes if isinstance(o, BaseException)]  # both waiters got the freed places


def test_requests_for_different_tasks_share_batches_and_each_row_keeps_its_task():
    seen = []

    def runner(batch: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        seen.append(tasks.tolist())
        time.sleep(0.05)
        return np.stack([batch.reshape(len(batch), -1)[:, 0], tasks.astype(np.float32)], axis=1)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5, task=0))
        await asyncio.sleep(0.01)  # the first batch runs while the other tasks' requests queue up
        rest = [batcher.submit([img], time.perf_counter() + 5, task=i % 3) for i, img in enumerate(images(6))]
        return await first, await asyncio.gather(*rest)

    _, rest = run(with_batcher(runner, body))
    assert [(float(r[0].logits[0]), int(r[0].logits[1])) for r in rest] == [(i, i % 3) for i in range(6)]
    assert any(len(set(tasks)) > 1 for tasks in seen[1:]), seen  # a batch mixed tasks


class OverlapRunner(FakeRunner):
    """Counts how many batches are inside the model at once."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.active = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            return super().__call__(batch)
        finally:
            with self.lock:
                self.active -= 1


async def with_instances(runner, body, instances: int, **kwargs):
    settings = {"max_batch": 2, "max_delay": 0.0, "max_queue": 16, **kwargs}
    with ThreadPoolExecutor(instances) as executor:
        batcher = MicroBatcher(runner, executor, instances=instances, **settings)
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop()


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_instances_run_that_many_batches_side_by_side_and_answer_every_request(instances):
    runner = OverlapRunner(seconds=0.1)

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit([img], time.perf_counter() + 5) for img in images(12)))

    results = run(with_instances(runner, body, instances))
    assert [float(r[0].logits[0]) for r in results] == [2.0 * i for i in range(12)]
    assert runner.most == instances, (runner.most, runner.batches)
    assert max(runner.batches) == 2 and sum(runner.batches) == 12


def test_stop_answers_every_running_batch_of_every_instance():
    runner = OverlapRunner(seconds=0.5)

    async def body(batcher):
        pending = [asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5)) for _ in range(6)]
        await asyncio.sleep(0.1)  # two batches of two are running, two images are queued
        await batcher.stop(timeout=0.1)
        return await asyncio.gather(*pending, return_exceptions=True)

    outcomes = run(with_instances(runner, body, 2))
    assert runner.most == 2
    assert all(isinstance(o, ServiceError) and o.status == 503 for o in outcomes), outcomes


def test_a_batch_that_breaks_after_inference_stops_the_batcher_and_answers_its_requests():
    failures = []

    async def body(batcher):
        return await asyncio.gather(
            *(batcher.submit([img], time.perf_counter() + 5) for img in images(4)), return_exceptions=True
        )

    def broken_metrics(size, seconds):
        raise RuntimeError("metrics broke")

    outcomes = run(with_instances(FakeRunner(0.05), body, 2, on_batch=broken_metrics, on_failure=failures.append))
    assert all(isinstance(o, ServiceError) and o.status == 500 for o in outcomes), outcomes
    assert failures and "metrics broke" in failures[0]


def test_stop_returns_when_a_batch_breaks_after_inference_during_the_drain():
    """The broken batch stops the loop while stop() waits on it: stop() must still return, not raise, and answer."""
    failures = []

    def broken_metrics(size, seconds):
        raise RuntimeError("metrics broke")

    async def go():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(
                FakeRunner(0.2),
                executor,
                max_batch=1,
                max_delay=0.0,
                max_queue=8,
                on_batch=broken_metrics,
                on_failure=failures.append,
            )
            batcher.start()
            pending = [asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5)) for _ in range(2)]
            await asyncio.sleep(0.05)  # one image is running, one is queued
            await batcher.stop(timeout=5)
            return await asyncio.gather(*pending, return_exceptions=True)

    outcomes = run(go())
    assert all(isinstance(o, ServiceError) and o.status in (500, 503) for o in outcomes), outcomes
    assert failures and "metrics broke" in failures[0]


def test_stop_refuses_waiting_requests_at_once():
    """A request waiting for a place has sent nothing the server read: on stop it hears 503 at once, rather than
    getting a place, having its body read and decoded, and being refused after all."""

    async def go():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(FakeRunner(0.3), executor, max_batch=1, max_delay=0.0, max_queue=1)
            batcher.start()
            running = asyncio.ensure_future(batcher.submit(images(1), time.perf_counter() + 5))
            await asyncio.sleep(0.05)
            held = await batcher.admit()  # the one place
            waiter = asyncio.ensure_future(batcher.admit(wait=2.0))
            await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(batcher.stop(timeout=5))
            start = time.perf_counter()
            outcome = (await asyncio.gather(waiter, return_exceptions=True))[0]
            refused_after = time.perf_counter() - start
            held.release()
            await stopping
            await running
            return outcome, refused_after

    outcome, refused_after = run(go())
    assert isinstance(outcome, ServiceError) and outcome.error_type == "shutting_down", outcome
    assert refused_after < 0.1


def test_a_place_freed_by_a_refused_submit_goes_to_a_waiting_request():
    async def body(batcher):
        first, _second = await batcher.admit(), await batcher.admit()  # both places are held
        waiter = asyncio.ensure_future(batcher.admit(wait=1.0))
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as too_many:
            await batcher.submit(images(3), time.perf_counter() + 5, first)  # three images for two places
        first.release()  # as `admitted` does on the way out
        start = time.perf_counter()
        outcome = (await asyncio.gather(waiter, return_exceptions=True))[0]
        return too_many.value, outcome, time.perf_counter() - start

    too_many, outcome, waited = run(with_batcher(FakeRunner(), body, max_queue=2))
    assert too_many.status == 429
    assert not isinstance(outcome, BaseException), outcome  # the freed place, not a 429 after the whole wait
    assert waited < 0.5


@pytest.mark.parametrize("ending", ["timeout", "cancel"])
def test_a_place_given_as_the_wait_ends_is_not_lost(ending):
    """A place handed to a waiter in the same loop pass as its wait ends (timeout or cancel) goes back to the queue
    (Python 3.12's wait_for raises then, dropping the handed place)."""

    async def body(batcher):
        held = await batcher.admit()
        waiter = asyncio.ensure_future(batcher.admit(wait=0.05 if ending == "timeout" else 5.0))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        if ending == "timeout":
            loop.call_later(0.04, held.release)  # the place frees just before the wait ends,
            loop.call_later(0.01, lambda: time.sleep(0.1))  # and a busy loop sees both in one pass
        else:
            held.release()
            waiter.cancel()
        outcome = (await asyncio.gather(waiter, return_exceptions=True))[0]
        if isinstance(outcome, Ticket):  # Python 3.11's wait_for returns the place instead
            outcome.release()
        return await batcher.admit()

    assert isinstance(run(with_batcher(FakeRunner(), body, max_queue=1)), Ticket)


def test_a_cancelled_request_counts_as_499_not_200():
    from service import metrics
    from service.context import RequestContext
    from service.pipeline import accounted

    def count(code):
        return metrics.REQUESTS.labels("cancel-test", code)._value.get()

    async def handler():
        with accounted(RequestContext("r1", {}, 10_000, model="cancel-test"), "CPUExecutionProvider"):
            await asyncio.sleep(10)

    async def go():
        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0.01)
        task.cancel()  # what uvicorn does to handlers still running when its shutdown timeout ends
        await asyncio.gather(task, return_exceptions=True)

    before = count("200"), count("499")
    run(go())
    assert (count("200"), count("499")) == (before[0], before[1] + 1)


def test_the_queue_depth_reported_falls_back_to_zero_as_batches_are_taken():
    depths = []

    async def body(batcher):
        await asyncio.gather(*(batcher.submit([img], time.perf_counter() + 5) for img in images(6)))
        return list(depths)  # before stop(), which reports 0 itself

    seen = run(with_batcher(FakeRunner(0.02), body, on_queue=depths.append))
    assert max(seen) >= 2 and seen[-1] == 0, seen


class Overlap:
    """A runner that records how many batches, of any model, compute at once."""

    def __init__(self, seconds: float):
        self.seconds, self.now, self.most, self.lock = seconds, 0, 0, threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return batch.reshape(len(batch), -1)[:, :2]


def test_models_sharing_a_device_compute_one_batch_at_a_time_and_time_only_their_own():
    """Two models on one device slot: their batches never overlap, and a batch's seconds exclude its wait for the
    slot (the other model's compute), so each model's per-image compute is its own whatever the traffic mix."""
    overlap, seconds = Overlap(0.05), []

    async def body():
        device = asyncio.Semaphore(1)
        with ThreadPoolExecutor(1) as a_pool, ThreadPoolExecutor(1) as b_pool:
            batchers = [
                MicroBatcher(
                    overlap,
                    pool,
                    max_batch=1,
                    max_delay=0,
                    max_queue=8,
                    device=device,
                    on_batch=lambda size, s: seconds.append(s),
                )
                for pool in (a_pool, b_pool)
            ]
            for batcher in batchers:
                batcher.start()
            image = np.ones((3, 2, 2), np.float32)
            deadline = time.perf_counter() + 10
            answers = await asyncio.gather(*(b.submit([image], deadline) for b in batchers for _ in range(3)))
            for batcher in batchers:
                await batcher.stop()
            return answers

    answers = run(body())
    assert len(answers) == 6 and overlap.most == 1
    assert len(seconds) == 6 and max(seconds) < 0.09  # each 0.05 s of its own, none with another's 0.05 s in it
    assert max(r[0].queue_seconds for r in answers) >= 0.2  # the waiting is counted as queue time instead


def test_a_retired_batcher_answers_what_it_holds_then_stops():
    """A version swapped out keeps no admitted request from its answer: held tickets and queued images finish."""
    runner = FakeRunner(0.02)

    async def body():
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch=2, max_delay=0, max_queue=4)
            batcher.start()
            image = np.ones((3, 2, 2), np.float32)
            deadline = time.perf_counter() + 10
            held = await batcher.admit()
            queued = asyncio.ensure_future(batcher.submit([image, image], deadline))
            await asyncio.sleep(0)
            retiring = asyncio.ensure_future(batcher.retire(timeout=5, poll=0.005))
            await asyncio.sleep(0.1)
            assert not retiring.done()  # the ticket is still held: its request may still submit
            late = await batcher.submit([image], deadline, held)
            await asyncio.wait_for(retiring, 5)
            with pytest.raises(ServiceError) as refused:
                await batcher.submit([image], deadline)
            return await queued, late, refused.value.status

    queued, late, status = run(body())
    assert len(queued) == 2 and len(late) == 1 and status == 503


def test_images_that_arrive_while_the_device_is_busy_join_the_waiting_batch():
    slow, sizes = Overlap(0.1), []

    def record(batch):
        sizes.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :2]

    async def body():
        device = asyncio.Semaphore(1)
        with ThreadPoolExecutor(1) as a_pool, ThreadPoolExecutor(1) as b_pool:
            a = MicroBatcher(slow, a_pool, max_batch=4, max_delay=0, max_queue=8, device=device)
            b = MicroBatcher(record, b_pool, max_batch=4, max_delay=0, max_queue=8, device=device)
            a.start(), b.start()
            image, deadline = np.ones((3, 2, 2), np.float32), time.perf_counter() + 10
            busy = asyncio.ensure_future(a.submit([image], deadline))
            await asyncio.sleep(0.02)  # a computes; b's first image forms a batch of one and waits for the device
            first = asyncio.ensure_future(b.submit([image], deadline))
            await asyncio.sleep(0.02)
            later = asyncio.ensure_future(b.submit([image, image], deadline))
            await asyncio.gather(busy, first, later)
            await a.stop(), await b.stop()

    run(body())
    assert sizes == [3]
