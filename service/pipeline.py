"""The steps every inference route shares: key, readiness and admission checks, reading the body in any of its
encodings, decoding and preprocessing (bounded, off the event loop), batching, and the request metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import metrics
from service.batcher import Result, Ticket
from service.context import RequestContext
from service.decode import CONTENT_TYPES, decode_image
from service.errors import ServiceError
from service.recent import RECENT
from service.runtime import ModelRunner, Task
from service.schemas import JsonRequest, Prediction
from service.settings import Settings
from service.state import State
from service.statistics import Statistics

T = TypeVar("T")


def check_key(headers: Mapping[str, str], settings: Settings) -> None:
    key = settings.api_key
    if key is None:
        return
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise ServiceError(401, "unauthorized", "a valid API key is required (Authorization: Bearer or X-API-Key)")


@dataclass
class Served:
    """What a request answered, filled in by its route: the images, and the stage timings of a success."""

    images: int = 0
    timing: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def accounted(
    context: RequestContext, provider: str, stats: Statistics | None = None, label: str | None = None
) -> Iterator[Served]:
    """Every request to a model counts once, under the context's model (or `label`: compare, explain): in flight
    while it runs, then its code (499: cancelled, never answered), error reason and latency (by task too for a
    multi-task model's; the task must be one the model serves, so the label set stays closed), and in Triton's
    statistics when `stats` is given."""
    model, task, start = label or context.model, context.task, context.start
    metrics.IN_FLIGHT.labels(model).inc()
    code, reason = 200, None
    served = Served()
    try:
        yield served
    except ServiceError as exc:
        code, reason = exc.status, exc.error_type
        raise
    except asyncio.CancelledError:  # uvicorn gave up on it at shutdown: it ends with no answer
        code, reason = 499, "cancelled"
        raise
    except Exception:
        code, reason = 500, "internal_error"
        raise
    finally:
        metrics.IN_FLIGHT.labels(model).dec()
        metrics.REQUESTS.labels(model, str(code)).inc()
        if reason:
            metrics.ERRORS.labels(model, reason).inc()
        elapsed = time.perf_counter() - start
        metrics.REQUEST_SECONDS.labels(model, provider).observe(elapsed)
        if task is not None:
            metrics.TASK_REQUESTS.labels(model, task, str(code)).inc()
            metrics.TASK_REQUEST_SECONDS.labels(model, task).observe(elapsed)
        if stats is not None:
            stats.request(model, task, code == 200, elapsed, served.images, served.timing)
        RECENT.observe(model, elapsed)


@contextlib.asynccontextmanager
async def admitted(context: RequestContext, state: State, model: str) -> AsyncIterator[Ticket]:
    """Key, readiness and a place in the model's queue, all before the body is read: overload costs a 429 only."""
    check_key(context.headers, state.settings)
    state.check_serving(model)
    batcher = state.batchers.get(model)
    if batcher is None:  # unloaded (model control) while the request was on its way here
        raise ServiceError(404, "model_not_found", f"no model {model!r}; served: {', '.join(state.batchers)}")
    start = time.perf_counter()
    ticket = await batcher.admit(state.settings.admission_wait_ms / 1000)
    context.mark("admission", start)
    try:
        yield ticket
    finally:
        ticket.release()


def is_byte_count(value: str) -> bool:
    """ASCII digits, at most 18 of them: `str.isdigit` also takes "²", and Python's int() refuses 4,300 digits."""
    return re.fullmatch(r"[0-9]{1,18}", value) is not None


async def read_body(request: Request, settings: Settings) -> bytes:
    limit = settings.max_bytes
    declared = request.headers.get("content-length")
    if declared and (not is_byte_count(declared) or int(declared) > limit):
        raise ServiceError(413, "payload_too_large", f"the body is {declared[:40]} bytes, over the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, "payload_too_large", f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServiceError(499, "cancelled", "the client closed the connection before sending its body") from None
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read within the limit
    return body


def b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "invalid_request", "an image is not valid base64") from None


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """The image bytes of a request, in any of the three body encodings."""
    body = await read_body(request, settings)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        raise ServiceError(400, "invalid_request", "the request body is empty")
    if content_type in CONTENT_TYPES:
        return [body]
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=4)
        except StarletteHTTPException as exc:  # Starlette's own 400 for a malformed multipart body
            raise ServiceError(400, "invalid_request", f"the multipart body is invalid: {exc.detail}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServiceError(400, "invalid_request", "the multipart body has no `file` part")
        return [await upload.read()]
    if content_type == "application/json":
        try:  # ValueError: bad JSON or UTF-8, an integer past Python's digit limit; RecursionError: deep nesting
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ServiceError(400, "invalid_request", "the body is not valid JSON") from None
        try:
            payload = JsonRequest.model_validate(data)
        except ValidationError as exc:
            raise ServiceError(422, "validation_error", str(exc.errors()[0]["msg"])) from None
        if payload.image_b64 is not None:
            return [b64(payload.image_b64)]
        if payload.images:
            if len(payload.images) > settings.max_images:
                many = f"{len(payload.images)} images, over the limit of {settings.max_images}"
                raise ServiceError(413, "payload_too_large", many)
            return [b64(item.b64) for item in payload.images]
        raise ServiceError(422, "validation_error", "give `image_b64` or a non-empty `images` list")
    raise ServiceError(
        415,
        "unsupported_media_type",
        "send image/jpeg, image/png or image/webp, multipart/form-data with `file`, or application/json",
    )


def each_decoded(raw: list[bytes], settings: Settings, size: int, deadline: float) -> Iterator[Image.Image]:
    """A request's images as RGB, decoded at (at least) `size`, one at a time (so a request never holds more than one
    at full size) and within the request's pixel budget; past the deadline no more is decoded. In a worker thread."""
    left = settings.max_request_pixels
    for data in raw:
        if time.perf_counter() > deadline:
            raise ServiceError(504, "timeout", "the request's deadline passed while its images were being decoded")
        image = decode_image(data, settings.max_pixels, size, left)
        left -= image.width * image.height
        yield image


async def decoded(context: RequestContext, state: State, raw: list[bytes], size: int) -> list:
    """Decoded images, in the decode pool: as many requests decode at once as there are cores."""

    def work() -> list:
        t = time.perf_counter()
        images = list(each_decoded(raw, state.settings, size, context.deadline))
        context.timing["decode"] = (time.perf_counter() - t) * 1000
        return images

    start = time.perf_counter()
    images = await in_decode_pool(state, work)
    context.mark("decode", start)
    return images


async def in_decode_pool(state: State, work: Callable[..., T], *args: object) -> T:
    """Decoding and preprocessing run off the event loop, as many at once as there are cores."""
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, work, *args)


async def all_or_none(coroutines: list[Awaitable[T]]) -> list[T]:
    """Run side by side; when one fails the others are cancelled, and have ended, before the error goes on: no work
    of a request outlives its answer, nor queues on a place that the request has already given back."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def prepared(context: RequestContext, state: State, runner: ModelRunner, raw: list[bytes]) -> list[np.ndarray]:
    """Encoded images as model inputs, exactly as in training: decoded and preprocessed in one worker-thread call,
    each image shrunk to the model's input before the next is decoded."""
    timing, deadline = context.timing, context.deadline

    def work() -> list[np.ndarray]:
        arrays, preprocessing, start = [], 0.0, time.perf_counter()
        for image in each_decoded(raw, state.settings, runner.img_size, deadline):
            t = time.perf_counter()
            arrays.append(runner.preprocess(image))
            preprocessing += time.perf_counter() - t
        decoding = time.perf_counter() - start - preprocessing
        timing["decode"], timing["preprocess"] = decoding * 1000, preprocessing * 1000
        return arrays

    start = time.perf_counter()
    arrays = await in_decode_pool(state, work)
    context.mark("decode", start)
    return arrays


async def batched(context: RequestContext, arrays: list[np.ndarray], ticket: Ticket, task: Task) -> list[Result]:
    """Through the batcher that admitted the request (a version swapped out meanwhile still answers it)."""
    submitted = time.perf_counter()
    results = await ticket.batcher.submit(arrays, context.deadline, ticket, task.index)
    queue, inference = max(r.queue_seconds for r in results), max(r.inference_seconds for r in results)
    context.timing["queue"], context.timing["inference"] = queue * 1000, inference * 1000
    context.mark("queue", submitted, submitted + queue)
    context.mark("inference", submitted + queue, submitted + queue + inference)
    return results


def finished(context: RequestContext, postprocess_started: float, served: Served, images: int) -> None:
    """A success: its stage timings into the metrics and into what `accounted` counts."""
    timing = context.timing
    timing["postprocess"] = (time.perf_counter() - postprocess_started) * 1000
    timing["total"] = context.elapsed_ms()
    for stage in metrics.STAGES:
        if stage in timing:
            metrics.STAGE_SECONDS.labels(context.model, stage).observe(timing[stage] / 1000)
    served.images, served.timing = images, timing


def top_predictions(logits: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    """A multi-task graph pads its logits to the most classes of any task: only the task's own are read."""
    logits = logits[: len(labels)]
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    order = np.argsort(-probs)[:k]
    return [Prediction(index=int(i), label=labels[i], score=float(probs[i])) for i in order]
