"""`POST /models/{model}/explain`: the predictions and the merge plan of one image, as JSON or as a picture.

Explaining needs the graph's second output, so it runs outside the batcher, one request at a time per process
(`FPET_EXPLAIN_CONCURRENCY`); a request that finds every slot taken is refused at once with a 429.
"""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from fpet import mergemap
from fpet.imaging import normalize, resize_rgb
from service.context import ContextDep
from service.errors import ServiceError
from service.pipeline import accounted, check_key, decoded, read_images, top_predictions
from service.runtime import ModelRunner, Task
from service.schemas import ERRORS, IMAGE_BODY, ExplainResponse, MergePoint
from service.state import State, StateDep

router = APIRouter(tags=["explain"])
PNG = "image/png"


def explain_image(runner: ModelRunner, image, task: Task) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Input pixels (uint8 [S, S, 3]), logits and merge maps of one decoded image."""
    pixels = resize_rgb(image, runner.img_size)
    tasks = None if task.index is None else np.array([task.index], dtype=np.int64)
    logits, maps = runner.explain(normalize(pixels[None], runner.mean, runner.std), tasks)
    return pixels.transpose(1, 2, 0), logits[0], None if maps is None else maps[0]


def overlay_png(runner: ModelRunner, pixels: np.ndarray, maps: np.ndarray) -> bytes:
    """The map after the last merge point over the input, as `fpet visualize` draws it."""
    buffer = io.BytesIO()
    mergemap.draw(pixels, maps[-1], tuple(runner.merge_maps["grid"])).save(buffer, format="PNG")
    return buffer.getvalue()


def wants_png(request: Request, format_: str | None) -> bool:
    if format_ is not None:
        return format_ == "png"
    return PNG in request.headers.get("accept", "")


async def acquire(state: State) -> None:
    """A free explain slot now, or a 429: explaining is for people looking at images, not for load."""
    if state.explain_slots.locked():
        raise ServiceError(
            429, "overloaded", "an explanation is being computed; try again shortly", {"Retry-After": "1"}
        )
    await state.explain_slots.acquire()


@router.post(
    "/models/{model}/explain",
    summary="Predictions and the merge plan of one image (JSON), or its merge map (PNG)",
    response_model=ExplainResponse,
    responses={**ERRORS, 200: {"content": {PNG: {}}, "description": "JSON, or the merge map with Accept: image/png"}},
    openapi_extra=IMAGE_BODY,
)
async def explain(
    request: Request,
    context: ContextDep,
    state: StateDep,
    model: str,
    top_k: int = Query(5, ge=1, le=20),
    format_: str | None = Query(None, alias="format", pattern="^(json|png)$", description="json or png (or Accept)"),
    task: str | None = Query(None, description="the task, for a multi-task model"),
):
    """Counted in the request metrics under the model label `explain`."""
    runner = state.runner(model)
    with accounted(context, runner.provider, label="explain"):
        chosen = runner.task(task)
        check_key(context.headers, state.settings)
        state.check_serving(runner.name)
        png = wants_png(request, format_)
        if png and runner.merge_maps is None:
            raise ServiceError(400, "invalid_request", f"model {model!r} merges no tokens: there is no map to draw")
        raw = await read_images(request, state.settings)  # before a slot: a slow upload holds none
        if len(raw) != 1:
            raise ServiceError(400, "invalid_request", f"explain takes one image; this request has {len(raw)}")
        (image,) = await decoded(context, state, raw, runner.img_size)
        await acquire(state)
        try:
            t = time.perf_counter()
            pixels, logits, maps = await asyncio.to_thread(explain_image, runner, image, chosen)
            inference = (time.perf_counter() - t) * 1000
            picture = await asyncio.to_thread(overlay_png, runner, pixels, maps) if png else None
        finally:
            state.explain_slots.release()
        if picture is not None:
            return Response(picture, media_type=PNG)
        info = runner.merge_maps
        merges = [] if maps is None else [MergePoint(**p) for p in mergemap.plan_json(maps, info["points"])]
        timing = {
            "decode": context.timing["decode"],
            "inference": inference,
            "total": context.elapsed_ms(),
        }
        return ExplainResponse(
            request_id=context.request_id,
            model=model,
            model_version=runner.manifest["version"],
            predictions=top_predictions(logits, chosen.labels, top_k),
            grid=info and info["grid"],
            merges=merges,
            timing_ms=timing,
        )
