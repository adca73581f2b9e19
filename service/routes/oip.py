"""Open Inference Protocol (KServe v2) inference and server metadata; the protocol itself is in service/oip.py."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

import fpet
from service import inference, oip
from service.context import ContextDep, RequestContext
from service.pipeline import read_body
from service.runtime import ModelRunner, Task
from service.schemas import OIP_BODY, OIP_RESPONSES
from service.state import State, StateDep

router = APIRouter(tags=["oip"])
DOC = {"responses": OIP_RESPONSES, "openapi_extra": OIP_BODY, "response_class": Response}


async def infer_with(
    request: Request, context: RequestContext, state: State, name: str, version: str | None
) -> Response:
    async def read(runner: ModelRunner) -> oip.InferRequest:
        body = await read_body(request, state.settings)
        return oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), runner.img_size)

    def answer(parsed: oip.InferRequest, logits: np.ndarray, task: Task) -> Response:
        content, headers = oip.encode_response(parsed, name, oip.VERSION, logits, task.labels)
        return Response(content, headers=headers)

    return await inference.infer(context, state, name, version, read, answer)


@router.post("/v2/models/{model}/infer", summary="Inference (Open Inference Protocol v2)", **DOC)
async def infer(request: Request, context: ContextDep, state: StateDep, model: str) -> Response:
    return await infer_with(request, context, state, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference of a model version", **DOC)
async def infer_version(request: Request, context: ContextDep, state: StateDep, model: str, version: str) -> Response:
    return await infer_with(request, context, state, model, version)


@router.get("/v2", summary="Server metadata (OIP v2)")
async def server_metadata() -> dict:
    return {"name": "fpet", "version": fpet.__version__, "extensions": oip.EXTENSIONS}
