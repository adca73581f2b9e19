"""Triton's model configuration and statistics extensions, which Triton's own tools (perf_analyzer, Model Analyzer)
and clients such as Ultralytics' TritonRemoteModel read before they send a request."""

from __future__ import annotations

from fastapi import APIRouter

from service import oip
from service.routes.models import NOT_FOUND
from service.runtime import ModelRunner
from service.state import State, StateDep

router = APIRouter(tags=["oip"])


def model_config(state: State, runner: ModelRunner, name: str) -> dict:
    """The model as Triton's JSON model configuration describes one: the batch dimension is implicit in `dims`. Both
    inputs are optional because a request carries exactly one of them."""
    m, settings = runner.manifest, state.settings
    size = m["img_size"]
    classes = len(runner.task(name).labels) if runner.tasks else m["num_classes"]
    on_gpu = runner.on_gpu
    return {
        "name": name,
        "platform": "openvino" if runner.runtime == "openvino" else "onnxruntime_onnx",
        "backend": runner.runtime,
        "version_policy": {"specific": {"versions": [int(oip.VERSION)]}},
        "max_batch_size": settings.max_images,
        "input": [
            {"name": oip.IMAGE, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1], "optional": True},
            {
                "name": oip.PIXELS,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, size, size],
                "optional": True,
            },
        ],
        "output": [{"name": output, "data_type": "TYPE_FP32", "dims": [classes]} for output in oip.OUTPUTS],
        "dynamic_batching": {
            "preferred_batch_size": [min(state.max_batch(runner), settings.max_images)],
            "max_queue_delay_microseconds": int(settings.max_delay_ms * 1000),
            # the batcher counts queued images, Triton requests: a request has at least one image
            "default_queue_policy": {"max_queue_size": settings.max_queue_images},
        },
        "instance_group": [
            {"name": runner.name, "kind": "KIND_GPU" if on_gpu else "KIND_CPU", "count": settings.instances}
        ],
        "model_transaction_policy": {"decoupled": False},
        "parameters": {
            "schedule": {"string_value": m["schedule"]},
            "precision": {"string_value": runner.precision},
            "execution_provider": {"string_value": runner.provider},
        },
    }


@router.get("/v2/models/{model}/config", summary="Model configuration (Triton's extension)", responses=NOT_FOUND)
async def config(state: StateDep, model: str) -> dict:
    return model_config(state, state.oip_model(model, None)[0], model)


@router.get("/v2/models/{model}/versions/{version}/config", include_in_schema=False)
async def config_version(state: StateDep, model: str, version: str) -> dict:
    return model_config(state, state.oip_model(model, version)[0], model)


@router.get("/v2/models/stats", summary="Statistics of every model (Triton's extension)")
async def all_stats(state: StateDep) -> dict:
    return {"model_stats": state.stats.snapshot()}


@router.get("/v2/models/{model}/stats", summary="Statistics of a model (Triton's extension)", responses=NOT_FOUND)
async def stats(state: StateDep, model: str) -> dict:
    state.oip_model(model, None)[0]
    return {"model_stats": state.stats.snapshot([model])}


@router.get("/v2/models/{model}/versions/{version}/stats", include_in_schema=False)
async def stats_version(state: StateDep, model: str, version: str) -> dict:
    state.oip_model(model, version)[0]
    return {"model_stats": state.stats.snapshot([model])}
