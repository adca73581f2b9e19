"""The service's own classification routes: /classify, /models/{model}/classify, /tasks/{task}/classify (multi-task
bundles) and /classify/compare."""

from __future__ import annotations

import contextlib
import time

from fastapi import APIRouter, Query, Request

from service.context import ContextDep, RequestContext
from service.pipeline import (
    accounted,
    admitted,
    all_or_none,
    batched,
    decoded,
    finished,
    in_decode_pool,
    prepared,
    read_images,
    top_predictions,
)
from service.schemas import ERRORS, IMAGE_BODY, ClassifyResponse, CompareEntry, CompareResponse, ImageResult, Timing
from service.shadow import maybe_shadow
from service.state import State, StateDep

router = APIRouter(tags=["classify"])
TOP_K = Query(5, ge=1, le=20)
TASK = Query(None, description="the task, for a multi-task model (GET /tasks lists them)")
DOC = {"responses": ERRORS, "openapi_extra": IMAGE_BODY, "response_model": ClassifyResponse}


async def classify_with(
    request: Request, context: RequestContext, state: State, model: str, top_k: int, task_name: str | None = None
) -> ClassifyResponse:
    runner = state.runner(model)
    task = runner.task(task_name)
    context.model, context.task = model, task.name
    with accounted(context, runner.provider, state.stats) as served:
        async with admitted(context, state, model) as ticket:
            raw = await read_images(request, state.settings)
            arrays = await prepared(context, state, runner, raw)
            results = await batched(context, arrays, ticket, task)
        maybe_shadow(state, runner, task, arrays, results)
        t = time.perf_counter()
        per_image = [top_predictions(r.logits, task.labels, top_k) for r in results]
        finished(context, t, served, len(results))
        return ClassifyResponse(
            request_id=context.request_id,
            model=model,
            task=task.name,
            model_version=runner.manifest["version"],
            execution_provider=runner.provider,
            predictions=per_image[0],
            results=[ImageResult(image=i, predictions=p) for i, p in enumerate(per_image)],
            timing_ms=Timing(**context.timing),
        )


@router.post("/classify", summary="Classify an image", **DOC)
async def classify(
    request: Request,
    context: ContextDep,
    state: StateDep,
    model: str | None = Query(None, description="variant: fpet or backbone (default: FPET_DEFAULT_MODEL, fpet)"),
    top_k: int = TOP_K,
    task: str | None = TASK,
) -> ClassifyResponse:
    return await classify_with(request, context, state, model or state.settings.default_model, top_k, task)


@router.post("/models/{model}/classify", summary="Classify with a given model", **DOC)
async def classify_model(
    request: Request, context: ContextDep, state: StateDep, model: str, top_k: int = TOP_K, task: str | None = TASK
) -> ClassifyResponse:
    return await classify_with(request, context, state, model, top_k, task)


@router.post("/tasks/{task}/classify", summary="Classify for one task of a multi-task model", **DOC)
async def classify_task(
    request: Request,
    context: ContextDep,
    state: StateDep,
    task: str,
    model: str | None = Query(None, description="variant: fpet or backbone (default: FPET_DEFAULT_MODEL, fpet)"),
    top_k: int = TOP_K,
) -> ClassifyResponse:
    """Requests for different tasks share batches: the graph picks each image's adapters and head."""
    return await classify_with(request, context, state, model or state.settings.default_model, top_k, task)


@router.post(
    "/classify/compare",
    summary="Every variant on the same image",
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    response_model=CompareResponse,
)
async def compare(
    request: Request, context: ContextDep, state: StateDep, top_k: int = TOP_K, task: str | None = TASK
) -> CompareResponse:
    """Counted in the request metrics under the model label `compare`."""
    runners = dict(state.runners)  # the versions served now, whatever model control swaps in meanwhile
    provider = ",".join(sorted({r.provider for r in runners.values()})) or "none"
    context.model = "compare"
    with accounted(context, provider):
        tasks = {name: runner.task(task) for name, runner in runners.items()}
        state.check_serving()
        async with contextlib.AsyncExitStack() as stack:
            tickets = {name: await stack.enter_async_context(admitted(context, state, name)) for name in runners}
            raw = await read_images(request, state.settings)
            size = max(r.img_size for r in runners.values())
            image = (await decoded(context, state, raw[:1], size))[0]

            async def one(name: str):
                runner = runners[name]
                array = await in_decode_pool(state, runner.preprocess, image)
                (result,) = await tickets[name].batcher.submit(
                    [array], context.deadline, tickets[name], tasks[name].index
                )
                return name, runner, result

            done = await all_or_none([one(n) for n in runners])
        entries = {
            name: CompareEntry(
                model_version=runner.manifest["version"],
                execution_provider=runner.provider,
                predictions=top_predictions(result.logits, tasks[name].labels, top_k),
                queue_ms=result.queue_seconds * 1000,
                inference_ms_per_image=result.inference_seconds * 1000 / result.batch_size,
                batch_size=result.batch_size,
            )
            for name, runner, result in done
        }
        tops = {e.predictions[0].index for e in entries.values()}
        speedup = None
        if "fpet" in entries and "backbone" in entries:
            speedup = entries["backbone"].inference_ms_per_image / max(entries["fpet"].inference_ms_per_image, 1e-9)
        timing = context.timing
        timing["total"] = context.elapsed_ms()
        return CompareResponse(
            request_id=context.request_id,
            models=entries,
            top1_agreement=len(tops) == 1,
            speedup=speedup,
            timing_ms={"decode": timing["decode"], "total": timing["total"]},
        )
