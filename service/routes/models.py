"""What is served: model metadata (also the Open Inference Protocol's), labels, and the server's settings."""

from __future__ import annotations

from fastapi import APIRouter, Query

import fpet
from fpet.runtimes import cpu_features, openvino_installed
from service import oip
from service.errors import ServiceError
from service.runtime import ModelRunner
from service.schemas import ErrorBody
from service.state import State, StateDep

router = APIRouter(tags=["models"])
NOT_FOUND = {404: {"model": ErrorBody}}


def metadata(state: State, runner: ModelRunner, task: str | None = None) -> dict:
    """A model's metadata; for one task of a multi-task model (an OIP model of its own), that task's."""
    m = runner.manifest
    size = m["img_size"]
    settings = state.settings
    classes = len(runner.task(task).labels) if task or not runner.tasks else m["num_classes"]
    return {
        "name": task or runner.name,
        "versions": [oip.VERSION],
        "bundle_version": m["version"],
        "platform": "openvino" if runner.runtime == "openvino" else "onnxruntime_onnx",
        "inputs": [
            {"name": oip.IMAGE, "datatype": "BYTES", "shape": [-1, 1]},
            {"name": oip.PIXELS, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, classes]} for name in oip.OUTPUTS],
        "execution_provider": runner.provider,
        "requested_providers": runner.requested,
        "provider_fallback": runner.fell_back,
        "precision": m["precision"],
        "runtime": runner.runtime,
        "compute_precision": runner.precision,
        "runtime_reason": runner.runtime_reason,
        "cpu_features": list(runner.cpu_features),
        "classes": classes,
        "backbone": m["backbone"]["name"],
        "method": m["method"],
        "schedule": m["schedule"],
        "tokens_per_block": m["tokens_per_block"],
        "gmacs_per_image": m["gmacs"],
        "gflops_per_image": 2 * m["gmacs"],
        "preprocessing": m["preprocessing"],
        "ready": state.model_ready(runner.name),
        "not_ready_reason": state.unready.get(runner.name),
        "selfcheck": runner.selfcheck,
        "batcher": {
            "max_batch_size": state.max_batch(runner),
            "max_delay_ms": settings.max_delay_ms,
            "max_queue_images": settings.max_queue_images,
        },
        "load_seconds": runner.load_seconds,
        "warmup_seconds": runner.warmup_seconds,
        "tasks": [t["name"] for t in m.get("tasks", [])] if task is None else None,
        "model": runner.name,
    }


@router.get("/models", summary="Served models")
async def models(state: StateDep) -> dict:
    return {"models": [metadata(state, r) for r in state.runners.values()]}


@router.get("/models/{model}", summary="Model metadata", responses=NOT_FOUND)
@router.get("/v2/models/{model}", include_in_schema=False)
async def model_metadata(state: StateDep, model: str) -> dict:
    variant, task = state.target(model)
    return metadata(state, state.runner(variant), task)


@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
async def model_version_metadata(state: StateDep, model: str, version: str) -> dict:
    variant, task = state.target(model)
    found = metadata(state, state.runner(variant), task)
    if version not in found["versions"]:
        raise ServiceError(404, "model_not_found", f"{model} has no version {version!r}")
    return found


@router.get("/models/{model}/labels", summary="Class labels", responses=NOT_FOUND)
async def labels(
    state: StateDep, model: str, task: str | None = Query(None, description="the task, for a multi-task model")
) -> list[str]:
    return state.runner(model).task(task).labels


@router.get("/tasks", summary="Tasks of the multi-task models served")
async def tasks(state: StateDep) -> dict:
    """Each task once, with the variants that serve it and its source run's measured test accuracy."""
    found: dict[str, dict] = {}
    for runner in state.runners.values():
        for entry in runner.manifest.get("tasks", []):
            test = entry["source_run"].get("metrics", {}).get("test", {}).get("last", {})
            task = found.setdefault(
                entry["name"],
                {
                    "name": entry["name"],
                    "labels": runner.tasks[entry["name"]].labels,
                    "num_classes": entry["num_classes"],
                    "test_accuracy": test.get("accuracy"),
                    "source_run": entry["source_run"]["sha256"][:12],
                    "models": [],
                },
            )
            task["models"].append(runner.name)
    return {"tasks": list(found.values())}


@router.get("/info", summary="Server, settings and models")
async def info(state: StateDep) -> dict:
    import onnxruntime

    settings = state.settings
    return {
        "name": "fpet",
        "version": fpet.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino_version(),
        "cpu_features": list(cpu_features()),
        "runtime": settings.runtime,
        "precision": settings.precision,
        "available_providers": onnxruntime.get_available_providers(),
        "ready": state.ready,
        "draining": state.draining,
        "reason": state.reason or None,
        "default_model": settings.default_model,
        "limits": {
            "max_bytes": settings.max_bytes,
            "max_pixels": settings.max_pixels,
            "max_images": settings.max_images,
            "deadline_ms": settings.deadline_ms,
        },
        "models": {n: metadata(state, r) for n, r in state.runners.items()},
    }


def openvino_version() -> str | None:
    if not openvino_installed():
        return None
    import openvino

    return openvino.__version__
