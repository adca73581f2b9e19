"""An Open Inference Protocol inference, whatever carries it (HTTP or gRPC): the same admission, limits, batcher,
metrics and statistics as /classify. A multi-task model's tasks are OIP models of their own, served by the default
variant."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from service import oip
from service.errors import ServiceError
from service.pipeline import accounted, admitted, batched, deadline_of, finished, prepared
from service.runtime import ModelRunner, Task
from service.shadow import maybe_shadow
from service.state import State

T = TypeVar("T")


async def infer(
    call,
    state: State,
    name: str,
    version: str | None,
    read: Callable[[ModelRunner], Awaitable[oip.InferRequest]],
    answer: Callable[[oip.InferRequest, np.ndarray, Task], T],
) -> T:
    """`call`: the request as the pipeline reads it (its headers and `state.timing`: a Starlette request, or the
    gRPC call's stand-in); `read` parses its inputs once admitted; `answer` encodes the logits of the task's classes."""
    start = time.perf_counter()
    runner, task_name = state.oip_model(name, version)
    model, task = runner.name, runner.task(task_name)
    settings = state.settings
    call.state.model, call.state.task = model, task.name
    with accounted(model, runner.provider, start, task.name, state.stats) as served:
        async with admitted(call, state, model) as ticket:
            parsed = await read(runner)
            if parsed.count > settings.max_images:
                many = f"{parsed.count} images, over the limit of {settings.max_images}"
                raise ServiceError(413, "payload_too_large", many)
            if parsed.images is not None:
                arrays = await prepared(call, state, runner, parsed.images, deadline_of(call, settings, start))
            else:
                arrays = list(parsed.pixels.astype(runner.dtype))
            results = await batched(call, state, arrays, start, ticket, task)
        maybe_shadow(state, runner, task, arrays, results)
        t = time.perf_counter()
        logits = np.stack([r.logits for r in results])[:, : len(task.labels)]
        response = answer(parsed, logits, task)
        finished(call, model, start, t, served, len(results))
        return response
