"""Liveness, readiness (also under the Open Inference Protocol's paths) and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from service import metrics
from service.errors import ServiceError
from service.schemas import ErrorBody
from service.state import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
@router.get("/v2/health/live", include_in_schema=False)
async def healthz() -> dict:
    return {"status": "alive"}


@router.get(
    "/readyz", summary="Readiness: every model loaded and warm, not draining", responses={503: {"model": ErrorBody}}
)
@router.get("/v2/health/ready", include_in_schema=False)
async def readyz(state: StateDep) -> dict:
    state.check_serving()
    if state.unready:  # the other models serve, but this instance is not what it was deployed to be
        raise ServiceError(503, "not_ready", f"not ready: {'; '.join(state.unready.values())}", {"Retry-After": "5"})
    return {"status": "ready", "models": {n: r.provider for n, r in state.runners.items()}}


@router.get(
    "/v2/models/{model}/ready",
    tags=["models"],
    summary="Model readiness (OIP v2)",
    responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
@router.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(state: StateDep, model: str, version: str | None = None) -> dict:
    """A multi-task model's tasks are OIP models of their own (as for inference)."""
    runner, _ = state.oip_model(model, version)
    state.check_serving(runner.name)
    return {"name": model, "ready": True}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
