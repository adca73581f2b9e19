"""An Open Inference Protocol inference, whatever carries it (HTTP or gRPC): the same admission, limits, batcher,
metrics and statistics as /classify. A multi-task model's tasks are OIP models of their own, served by the default
variant."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from service import oip
from service.context import RequestContext
from service.errors import ServiceError
from service.pipeline import accounted, admitted, batched, finished, prepared
from service.runtime import ModelRunner, Task
from service.shadow import maybe_shadow
from service.state import State

T = TypeVar("T")


async def infer(
    context: RequestContext,
    state: State,
    name: str,
    version: str | None,
    read: Callable[[ModelRunner], Awaitable[oip.InferRequest]],
    answer: Callable[[oip.InferRequest, np.ndarray, Task], T],
) -> T:
    """`read` parses the request's inputs once it is admitted; `answer` encodes the logits of the task's classes."""
    runner, task_name = state.oip_model(name, version)
    task = runner.task(task_name)
    settings = state.settings
    context.model, context.task = runner.name, task.name
    with accounted(context, runner.provider, state.stats) as served:
        async with admitted(context, state, runner.name) as ticket:
            parsed = await read(runner)
            if parsed.count > settings.max_images:
                many = f"{parsed.count} images, over the limit of {settings.max_images}"
                raise ServiceError(413, "payload_too_large", many)
            if parsed.images is not None:
                arrays = await prepared(context, state, runner, parsed.images)
            else:
                arrays = list(parsed.pixels.astype(runner.dtype))
            results = await batched(context, arrays, ticket, task)
        maybe_shadow(state, runner, task, arrays, results)
        t = time.perf_counter()
        logits = np.stack([r.logits for r in results])[:, : len(task.labels)]
        response = answer(parsed, logits, task)
        finished(context, t, served, len(results))
        return response
