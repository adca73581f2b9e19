"""Shadow agreement: a share of the default variant's requests (`FPET_SHADOW_RATE`) also run on the reference
variant (the backbone), after they are answered, to count how often the two agree on top-1. On a deployment's own
traffic that is the accuracy cost of merging, measured where no labels exist.

Shadow work is the service's lowest priority: it is made only when every queue is empty and the device has a free
slot, else dropped (and counted), and it runs as a task of its own, so it never delays nor fails the request it
copies. Its batches are counted as the reference's (`fpet_images_total`, its batch seconds): they are its compute.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np

from service import metrics
from service.batcher import Result
from service.errors import ServiceError
from service.runtime import ModelRunner, Task
from service.state import State

log = logging.getLogger("fpet.service")


def initialise(state: State) -> None:
    """With shadowing on, its series exist at zero from the start: dashboards and alerts see 0, not nothing."""
    settings = state.settings
    if settings.shadow_rate > 0:
        for agree in ("true", "false"):
            metrics.SHADOW.labels(settings.default_model, settings.shadow_reference, agree)
        for reason in ("busy", "no_reference", "incompatible", "overloaded", "shutting_down", "internal_error"):
            metrics.SHADOW_DROPPED.labels(reason)


def busy(state: State) -> bool:
    return state.device.locked() or any(not b.idle for b in state.batchers.values())


def maybe_shadow(
    state: State, runner: ModelRunner, task: Task, arrays: list[np.ndarray], results: list[Result]
) -> None:
    """Called once a default-variant request has its logits; decides, and starts the shadow run if it goes."""
    settings = state.settings
    if settings.shadow_rate <= 0 or runner.name != settings.default_model or settings.shadow_reference == runner.name:
        return
    if random.random() >= settings.shadow_rate:
        return
    reference = state.runners.get(settings.shadow_reference)
    if reference is None:
        metrics.SHADOW_DROPPED.labels("no_reference").inc()
        return
    same_input = (reference.img_size, reference.mean, reference.std, reference.dtype) == (
        runner.img_size,
        runner.mean,
        runner.std,
        runner.dtype,
    )
    served = task.name is None if not reference.tasks else task.name in reference.tasks
    if not same_input or not served:
        metrics.SHADOW_DROPPED.labels("incompatible").inc()
        return
    if busy(state):
        metrics.SHADOW_DROPPED.labels("busy").inc()
        return
    tops = [int(np.argmax(r.logits[: len(task.labels)])) for r in results]
    job = asyncio.get_running_loop().create_task(run(state, runner.name, reference, task, arrays, tops))
    state.shadows.add(job)
    job.add_done_callback(state.shadows.discard)


async def run(
    state: State, model: str, reference: ModelRunner, task: Task, arrays: list[np.ndarray], tops: list[int]
) -> None:
    batcher = state.batchers.get(reference.name)
    if batcher is None:
        metrics.SHADOW_DROPPED.labels("no_reference").inc()
        return
    index = reference.task(task.name).index
    try:
        results = await batcher.submit(arrays, time.perf_counter() + state.settings.deadline_ms / 1000, None, index)
    except ServiceError as exc:  # the reference's queue filled meanwhile, or the service is stopping
        metrics.SHADOW_DROPPED.labels(exc.error_type).inc()
        return
    except Exception:
        log.exception("a shadow run on %s failed", reference.name)
        metrics.SHADOW_DROPPED.labels("internal_error").inc()
        return
    for top, result in zip(tops, results, strict=True):
        agree = top == int(np.argmax(result.logits[: len(task.labels)]))
        metrics.SHADOW.labels(model, reference.name, "true" if agree else "false").inc()
