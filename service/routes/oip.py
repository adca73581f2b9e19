"""Open Inference Protocol (KServe v2) inference and server metadata; the protocol itself is in service/oip.py."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

import fpet
from service import oip
from service.errors import ServiceError
from service.pipeline import accounted, admitted, batched, deadline_of, finished, prepared, read_body
from service.schemas import OIP_BODY, OIP_RESPONSES
from service.state import State, StateDep

router = APIRouter(tags=["oip"])
DOC = {"responses": OIP_RESPONSES, "openapi_extra": OIP_BODY, "response_class": Response}


async def infer_with(request: Request, state: State, name: str, version: str | None) -> Response:
    """The same admission, limits, batcher and metrics as /classify. A multi-task model's tasks are OIP models of
    their own, served by the default variant."""
    start = time.perf_counter()
    model, task_name = state.target(name)
    runner = state.runner(model)
    task = runner.task(task_name)
    if version is not None and version != oip.VERSION:
        raise ServiceError(404, "model_not_found", f"{model} has no version {version!r}; it serves {oip.VERSION!r}")
    settings = state.settings
    with accounted(model, runner.provider, start, task.name, state.stats) as served:
        async with admitted(request, state, model) as ticket:
            body = await read_body(request, settings)
            parsed = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), runner.img_size)
            if parsed.count > settings.max_images:
                many = f"{parsed.count} images, over the limit of {settings.max_images}"
                raise ServiceError(413, "payload_too_large", many)
            if parsed.images is not None:
                arrays = await prepared(request, state, runner, parsed.images, deadline_of(request, settings, start))
            else:
                arrays = list(parsed.pixels.astype(runner.dtype))
            results = await batched(request, state, model, arrays, start, ticket, task)
        t = time.perf_counter()
        logits = np.stack([r.logits for r in results])
        logits = logits[:, : len(task.labels)]
        content, headers = oip.encode_response(parsed, name, oip.VERSION, logits, task.labels)
        finished(request, model, start, t, served, len(results))
        return Response(content, headers=headers)


@router.post("/v2/models/{model}/infer", summary="Inference (Open Inference Protocol v2)", **DOC)
async def infer(request: Request, state: StateDep, model: str) -> Response:
    return await infer_with(request, state, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference of a model version", **DOC)
async def infer_version(request: Request, state: StateDep, model: str, version: str) -> Response:
    return await infer_with(request, state, model, version)


@router.get("/v2", summary="Server metadata (OIP v2)")
async def server_metadata() -> dict:
    return {
        "name": "fpet",
        "version": fpet.__version__,
        "extensions": ["binary_tensor_data", "classification", "model_configuration", "statistics"],
    }
