"""What is served: model metadata (also the Open Inference Protocol's), labels, and the server's settings."""

from __future__ import annotations

from fastapi import APIRouter

import fpet
from service import oip
from service.errors import ServiceError
from service.runtime import ModelRunner
from service.schemas import ErrorBody
from service.state import State, StateDep

router = APIRouter(tags=["models"])
NOT_FOUND = {404: {"model": ErrorBody}}


def metadata(state: State, runner: ModelRunner) -> dict:
    m = runner.manifest
    size = m["img_size"]
    settings = state.settings
    return {
        "name": runner.name, "versions": [m["version"]], "platform": "onnxruntime_onnx",
        "inputs": [{"name": oip.IMAGE, "datatype": "BYTES", "shape": [-1]},
                   {"name": oip.PIXELS, "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, len(runner.labels)]} for name in oip.OUTPUTS],
        "execution_provider": runner.provider, "requested_providers": runner.requested,
        "provider_fallback": runner.fell_back, "precision": m["precision"], "classes": len(runner.labels),
        "backbone": m["backbone"]["name"], "method": m["method"], "schedule": m["schedule"],
        "tokens_per_block": m["tokens_per_block"], "gmacs_per_image": m["gmacs"], "gflops_per_image": 2 * m["gmacs"],
        "preprocessing": m["preprocessing"], "ready": state.ready,
        "batcher": {"max_batch_size": state.max_batch(runner), "max_delay_ms": settings.max_delay_ms,
                    "max_queue_images": settings.max_queue_images},
        "load_seconds": runner.load_seconds, "warmup_seconds": runner.warmup_seconds,
    }  # fmt: skip


@router.get("/models", summary="Served models")
async def models(state: StateDep) -> dict:
    return {"models": [metadata(state, r) for r in state.runners.values()]}


@router.get("/models/{model}", summary="Model metadata", responses=NOT_FOUND)
@router.get("/v2/models/{model}", include_in_schema=False)
async def model_metadata(state: StateDep, model: str) -> dict:
    return metadata(state, state.runner(model))


@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
async def model_version_metadata(state: StateDep, model: str, version: str) -> dict:
    found = metadata(state, state.runner(model))
    if version not in found["versions"]:
        raise ServiceError(404, "model_not_found", f"{model} has no version {version!r}")
    return found


@router.get("/models/{model}/labels", summary="Class labels", responses=NOT_FOUND)
async def labels(state: StateDep, model: str) -> list[str]:
    return state.runner(model).labels


@router.get("/info", summary="Server, settings and models")
async def info(state: StateDep) -> dict:
    import onnxruntime

    settings = state.settings
    return {
        "name": "fpet", "version": fpet.__version__, "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(), "ready": state.ready,
        "draining": state.draining, "reason": state.reason or None, "default_model": settings.default_model,
        "limits": {"max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels,
                   "max_images": settings.max_images, "deadline_ms": settings.deadline_ms},
        "models": {n: metadata(state, r) for n, r in state.runners.items()},
    }  # fmt: skip
