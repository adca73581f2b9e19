"""The FastAPI application: routes, request reading, the per-model batchers, readiness, drain and metrics.

The service imports no training code and runs no PyTorch: it serves ONNX bundles with onnxruntime, and what it must
share with training (preprocessing, labels, input size) comes from each bundle's manifest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import fpet
from fpet.paths import default_bundle_dir
from service import metrics, oip
from service.batcher import MicroBatcher, Result
from service.decode import CONTENT_TYPES, decode_image
from service.errors import ServiceError
from service.runtime import ModelRunner
from service.schemas import (
    ClassifyResponse,
    CompareEntry,
    CompareResponse,
    ErrorBody,
    ImageResult,
    JsonRequest,
    Prediction,
    Timing,
)
from service.settings import Settings

log = logging.getLogger("fpet.service")
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 500, 503, 504)}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as a multipart `file`, a raw JPEG/PNG/WebP body, or JSON (`image_b64` or `images`)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            **{
                t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "image/webp")
            },
            "application/json": {"schema": JsonRequest.model_json_schema()},
        },
    }
}

OIP_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image", "pixel_values"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32", "FP16"]},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "description": "row-major, flat or nested; BYTES elements as base64 strings"},
    },
}
OIP_BODY = {
    "requestBody": {
        "required": True,
        "description": "An Open Inference Protocol request: one input, `image` (BYTES: encoded JPEG/PNG/WebP files, "
        "shape [N] or [N, 1]) or `pixel_values` (FP32 [N, 3, S, S], preprocessed as the model metadata says); with "
        "Triton's binary extension the JSON header is followed by the tensor bytes "
        "(`Inference-Header-Content-Length`).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": OIP_TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["probabilities", "logits"]},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
OIP_RESPONSES = {
    **ERRORS,
    200: {
        "description": "outputs `probabilities` and `logits` (FP32 [N, classes]), or top-k `score:index:label` "
        "strings (BYTES [N, k]) for an output asked with `classification: k`; binary outputs follow the JSON header",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model_name", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


class State:
    """What the app holds while it runs."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.runners: dict[str, ModelRunner] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.executors: list[ThreadPoolExecutor] = []
        self.ready = False
        self.draining = False
        self.reason = "loading models"

    def max_batch(self, runner: ModelRunner) -> int:
        return self.settings.max_batch_size or (32 if runner.on_gpu else 8)


def bundle_paths(settings: Settings) -> list[str]:
    return settings.bundles or [str(default_bundle_dir(v)) for v in ("fpet", "backbone")]


def load(state: State) -> None:
    """Load and warm every bundle (in a worker thread: this takes seconds)."""
    settings = state.settings
    for path in bundle_paths(settings):
        runner = ModelRunner(path, settings.providers, settings.threads)
        if runner.name in state.runners:
            raise ServiceError(500, "internal_error", f"two bundles serve the variant {runner.name!r}")
        runner.warm_up(state.max_batch(runner))
        state.runners[runner.name] = runner
        metrics.initialise(runner.name)
        m = runner.manifest
        metrics.INFO.labels(runner.name, m["version"], m["backbone"]["name"], runner.provider, m["precision"],
                            m["schedule"]).set(1)  # fmt: skip
        metrics.GFLOPS.labels(runner.name).set(2 * m["gmacs"])
        metrics.LOAD_SECONDS.labels(runner.name).set(runner.load_seconds)
        metrics.WARMUP_SECONDS.labels(runner.name).set(runner.warmup_seconds)
        if runner.fell_back:
            metrics.FALLBACKS.labels(runner.name).inc()
        log.info("%s ready on %s (load %.1f s, warm-up %.1f s)", runner.name, runner.provider,
                 runner.load_seconds, runner.warmup_seconds)  # fmt: skip


def start_batchers(state: State) -> None:
    settings = state.settings
    for name, runner in state.runners.items():
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        state.executors.append(executor)

        def on_batch(size: int, seconds: float, name: str = name, provider: str = runner.provider) -> None:
            metrics.BATCH_SECONDS.labels(name, provider).observe(seconds)
            metrics.BATCH_SIZE.labels(name).observe(size)
            metrics.BATCHES.labels(name).inc()
            metrics.IMAGES.labels(name).inc(size)

        batcher = MicroBatcher(
            runner.run, executor, max_batch=state.max_batch(runner), max_delay=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue_images, on_batch=on_batch,
            on_queue=lambda depth, name=name: metrics.QUEUE_IMAGES.labels(name).set(depth),
        )  # fmt: skip
        batcher.start()
        state.batchers[name] = batcher


def watch_sigterm(state: State) -> None:
    """Readiness drops to 503 the moment SIGTERM arrives; uvicorn's own handler then drains connections."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def handler(signum: int, frame: Any) -> None:
        state.draining, state.ready = True, False
        for name in state.runners:
            metrics.READY.labels(name).set(0)
        previous(signum, frame)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. a test client): nothing to chain
        signal.signal(signal.SIGTERM, handler)


async def drain(state: State) -> None:
    state.draining, state.ready = True, False
    deadline = time.monotonic() + state.settings.drain_timeout_s
    while time.monotonic() < deadline and not all(b.idle for b in state.batchers.values()):
        await asyncio.sleep(0.01)
    for batcher in state.batchers.values():
        await batcher.stop()
    for executor in state.executors:
        executor.shutdown(wait=False)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        import onnxruntime

        metrics.BUILD.labels(fpet.__version__, "unknown", onnxruntime.__version__).set(1)
        watch_sigterm(state)
        try:
            await asyncio.to_thread(load, state)
        except Exception as exc:
            log.exception("could not load the models")
            state.reason = f"could not load the models: {exc}"
            yield
            return
        start_batchers(state)
        fallbacks = [n for n, r in state.runners.items() if r.fell_back]
        if fallbacks and not settings.allow_cpu_fallback:
            state.reason = f"{', '.join(fallbacks)} fell back from CUDA to CPU and FPET_ALLOW_CPU_FALLBACK is off"
        else:
            state.ready, state.reason = True, ""
        for name in state.runners:
            metrics.READY.labels(name).set(1 if state.ready else 0)
        yield
        await drain(state)

    app = FastAPI(
        title="FPET image classification",
        version=fpet.__version__,
        description="Classify images with an FPET-tuned ViT and compare it with the same model without token merging.",
        lifespan=lifespan,
    )
    app.state.fpet = state

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        incoming = request.headers.get("x-request-id", "")
        request.state.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        request.state.timing = {}
        start = time.perf_counter()
        response = await call_next(request)
        timing = request.state.timing
        timing.setdefault("total", (time.perf_counter() - start) * 1000)
        response.headers["X-Request-Id"] = request.state.request_id
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in timing.items())
        return response

    def error_response(request: Request, status: int, error_type: str, message: str, headers=None) -> JSONResponse:
        body = {"error": message, "error_type": error_type, "request_id": getattr(request.state, "request_id", None)}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.status, exc.error_type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(request, 422, "validation_error", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return error_response(request, exc.status_code, kinds.get(exc.status_code, "invalid_request"), str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        log.exception("request %s failed", rid)
        return error_response(request, 500, "internal_error", f"internal error; quote request id {rid} to the operator")

    # ---- helpers used by the routes ----

    def runner_for(model: str) -> ModelRunner:
        if model not in state.runners:
            served = ", ".join(state.runners) or "none yet"
            raise ServiceError(404, "model_not_found", f"no model {model!r}; served: {served}")
        return state.runners[model]

    def check_serving() -> None:
        if state.draining:
            raise ServiceError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not state.ready:
            raise ServiceError(503, "not_ready", f"not ready: {state.reason}", {"Retry-After": "5"})

    def check_key(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
            raise ServiceError(401, "unauthorized", "a valid API key is required (Authorization: Bearer or X-API-Key)")

    async def read_body(request: Request) -> bytes:
        limit = settings.max_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ServiceError(413, "payload_too_large", f"the body is {declared} bytes, over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, "payload_too_large", f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # lets request.form() parse what was already read within the limit
        return body

    def b64(text: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(400, "invalid_request", "an image is not valid base64") from None

    async def read_images(request: Request) -> list[bytes]:
        """The image bytes of a request, in any of the three body encodings."""
        body = await read_body(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not body:
            raise ServiceError(400, "invalid_request", "the request body is empty")
        if content_type in CONTENT_TYPES:
            return [body]
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ServiceError(400, "invalid_request", "the multipart body has no `file` part")
            return [await upload.read()]
        if content_type == "application/json":
            try:
                payload = JsonRequest.model_validate(json.loads(body))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ServiceError(400, "invalid_request", "the body is not valid JSON") from None
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
            415, "unsupported_media_type",
            "send image/jpeg, image/png or image/webp, multipart/form-data with `file`, or application/json",
        )  # fmt: skip

    def deadline_of(request: Request, start: float) -> float:
        budget = settings.deadline_ms
        asked = request.headers.get("x-request-timeout-ms")
        if asked is not None:
            try:
                budget = min(budget, float(asked))
            except ValueError:
                raise ServiceError(400, "invalid_request", "X-Request-Timeout-Ms must be a number") from None
        return start + budget / 1000

    def top_predictions(logits: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
        shifted = np.exp(logits - logits.max())
        probs = shifted / shifted.sum()
        order = np.argsort(-probs)[:k]
        return [Prediction(index=int(i), label=labels[i], score=float(probs[i])) for i in order]

    async def decode_all(images: list[bytes]) -> list:
        return await asyncio.to_thread(lambda: [decode_image(data, settings.max_pixels) for data in images])

    @contextlib.contextmanager
    def accounted(model: str, provider: str, start: float) -> Iterator[None]:
        """Every request to a model counts once: in flight while it runs, then its code, error reason and latency."""
        metrics.IN_FLIGHT.labels(model).inc()
        code, reason = 200, None
        try:
            yield
        except ServiceError as exc:
            code, reason = exc.status, exc.error_type
            raise
        except Exception:
            code, reason = 500, "internal_error"
            raise
        finally:
            metrics.IN_FLIGHT.labels(model).dec()
            metrics.REQUESTS.labels(model, str(code)).inc()
            if reason:
                metrics.ERRORS.labels(model, reason).inc()
            metrics.REQUEST_SECONDS.labels(model, provider).observe(time.perf_counter() - start)

    async def prepared(request: Request, runner: ModelRunner, raw: list[bytes]) -> list[np.ndarray]:
        """Encoded images as model inputs, decoded and preprocessed off the event loop, exactly as in training."""
        timing = request.state.timing
        t = time.perf_counter()
        decoded = await decode_all(raw)
        timing["decode"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        arrays = await asyncio.to_thread(lambda: [runner.preprocess(image) for image in decoded])
        timing["preprocess"] = (time.perf_counter() - t) * 1000
        return arrays

    async def batched(request: Request, model: str, arrays: list[np.ndarray], start: float) -> list[Result]:
        results = await state.batchers[model].submit(arrays, deadline_of(request, start))
        request.state.timing["queue"] = max(r.queue_seconds for r in results) * 1000
        request.state.timing["inference"] = max(r.inference_seconds for r in results) * 1000
        return results

    def finished(request: Request, model: str, start: float, postprocess_started: float) -> None:
        timing = request.state.timing
        timing["postprocess"] = (time.perf_counter() - postprocess_started) * 1000
        timing["total"] = (time.perf_counter() - start) * 1000
        for stage in metrics.STAGES:
            if stage in timing:
                metrics.STAGE_SECONDS.labels(model, stage).observe(timing[stage] / 1000)

    async def classify_with(request: Request, model: str, top_k: int) -> ClassifyResponse:
        start = time.perf_counter()
        runner = runner_for(model)
        with accounted(model, runner.provider, start):
            check_key(request)
            check_serving()
            arrays = await prepared(request, runner, await read_images(request))
            results = await batched(request, model, arrays, start)
            t = time.perf_counter()
            per_image = [top_predictions(r.logits, runner.labels, top_k) for r in results]
            finished(request, model, start, t)
            return ClassifyResponse(
                request_id=request.state.request_id, model=model, model_version=runner.manifest["version"],
                execution_provider=runner.provider, predictions=per_image[0],
                results=[ImageResult(image=i, predictions=p) for i, p in enumerate(per_image)],
                timing_ms=Timing(**request.state.timing),
            )  # fmt: skip

    async def infer_with(request: Request, model: str, version: str | None) -> Response:
        """Open Inference Protocol inference: the same limits, batcher and metrics as /classify."""
        start = time.perf_counter()
        runner = runner_for(model)
        if version is not None and version != runner.manifest["version"]:
            raise ServiceError(404, "model_not_found", f"{model} has no version {version!r}; it serves "
                                                       f"{runner.manifest['version']!r}")  # fmt: skip
        with accounted(model, runner.provider, start):
            check_key(request)
            check_serving()
            body = await read_body(request)
            parsed = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), runner.img_size)
            if parsed.count > settings.max_images:
                many = f"{parsed.count} images, over the limit of {settings.max_images}"
                raise ServiceError(413, "payload_too_large", many)
            if parsed.images is not None:
                arrays = await prepared(request, runner, parsed.images)
            else:
                arrays = list(parsed.pixels.astype(runner.dtype))
            results = await batched(request, model, arrays, start)
            t = time.perf_counter()
            logits = np.stack([r.logits for r in results])
            content, headers = oip.encode_response(parsed, model, runner.manifest["version"], logits, runner.labels)
            finished(request, model, start, t)
            return Response(content, headers=headers)

    # ---- routes ----

    classify_doc = {"responses": ERRORS, "openapi_extra": IMAGE_BODY, "response_model": ClassifyResponse}

    @app.post("/classify", tags=["classify"], summary="Classify an image", **classify_doc)
    async def classify(
        request: Request,
        model: str = Query(settings.default_model, description="variant: fpet or backbone"),
        top_k: int = Query(5, ge=1, le=20),
    ) -> ClassifyResponse:
        return await classify_with(request, model, top_k)

    @app.post("/models/{model}/classify", tags=["classify"], summary="Classify with a given model", **classify_doc)
    async def classify_model(request: Request, model: str, top_k: int = Query(5, ge=1, le=20)) -> ClassifyResponse:
        return await classify_with(request, model, top_k)

    @app.post("/classify/compare", tags=["classify"], summary="Every variant on the same image",
              responses=ERRORS, openapi_extra=IMAGE_BODY, response_model=CompareResponse)  # fmt: skip
    async def compare(request: Request, top_k: int = Query(5, ge=1, le=20)) -> CompareResponse:
        start = time.perf_counter()
        check_key(request)
        check_serving()
        raw = await read_images(request)
        t = time.perf_counter()
        image = (await decode_all(raw[:1]))[0]
        decode_ms = (time.perf_counter() - t) * 1000

        async def one(name: str, runner: ModelRunner):
            array = await asyncio.to_thread(runner.preprocess, image)
            (result,) = await state.batchers[name].submit([array], deadline_of(request, start))
            return name, runner, result

        done = await asyncio.gather(*(one(n, r) for n, r in state.runners.items()))
        entries = {
            name: CompareEntry(
                model_version=runner.manifest["version"],
                execution_provider=runner.provider,
                predictions=top_predictions(result.logits, runner.labels, top_k),
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
        total = (time.perf_counter() - start) * 1000
        request.state.timing.update(decode=decode_ms, total=total)
        return CompareResponse(request_id=request.state.request_id, models=entries, top1_agreement=len(tops) == 1,
                               speedup=speedup, timing_ms={"decode": decode_ms, "total": total})  # fmt: skip

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    @app.get("/v2/health/live", tags=["health"], include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], summary="Readiness: every model loaded and warm, not draining",
             responses={503: {"model": ErrorBody}})  # fmt: skip
    @app.get("/v2/health/ready", tags=["health"], include_in_schema=False)
    async def readyz(request: Request) -> dict:
        check_serving()
        return {"status": "ready", "models": {n: r.provider for n, r in state.runners.items()}}

    def metadata(runner: ModelRunner) -> dict:
        m = runner.manifest
        size = m["img_size"]
        return {
            "name": runner.name, "versions": [m["version"]], "platform": "onnxruntime_onnx",
            "inputs": [{"name": oip.IMAGE, "datatype": "BYTES", "shape": [-1]},
                       {"name": oip.PIXELS, "datatype": "FP32", "shape": [-1, 3, size, size]}],
            "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, len(runner.labels)]} for name in oip.OUTPUTS],
            "execution_provider": runner.provider, "requested_providers": runner.requested,
            "provider_fallback": runner.fell_back, "precision": m["precision"], "classes": len(runner.labels),
            "backbone": m["backbone"]["name"], "method": m["method"], "schedule": m["schedule"],
            "tokens_per_block": m["tokens_per_block"], "gmacs_per_image": m["gmacs"],
            "gflops_per_image": 2 * m["gmacs"],
            "preprocessing": m["preprocessing"], "ready": state.ready,
            "batcher": {"max_batch_size": state.max_batch(runner), "max_delay_ms": settings.max_delay_ms,
                        "max_queue_images": settings.max_queue_images},
            "load_seconds": runner.load_seconds, "warmup_seconds": runner.warmup_seconds,
        }  # fmt: skip

    @app.get("/models", tags=["models"], summary="Served models")
    async def models() -> dict:
        return {"models": [metadata(r) for r in state.runners.values()]}

    @app.get("/models/{model}", tags=["models"], summary="Model metadata", responses={404: {"model": ErrorBody}})
    @app.get("/v2/models/{model}", tags=["models"], include_in_schema=False)
    async def model_metadata(model: str) -> dict:
        return metadata(runner_for(model))

    @app.get("/v2/models/{model}/versions/{version}", tags=["models"], include_in_schema=False)
    async def model_version_metadata(model: str, version: str) -> dict:
        found = metadata(runner_for(model))
        if version not in found["versions"]:
            raise ServiceError(404, "model_not_found", f"{model} has no version {version!r}")
        return found

    @app.post("/v2/models/{model}/infer", tags=["oip"], summary="Inference (Open Inference Protocol v2)",
              responses=OIP_RESPONSES, openapi_extra=OIP_BODY, response_class=Response)  # fmt: skip
    async def infer(request: Request, model: str) -> Response:
        return await infer_with(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer", tags=["oip"], summary="Inference of a model version",
              responses=OIP_RESPONSES, openapi_extra=OIP_BODY, response_class=Response)  # fmt: skip
    async def infer_version(request: Request, model: str, version: str) -> Response:
        return await infer_with(request, model, version)

    @app.get("/v2", tags=["oip"], summary="Server metadata (OIP v2)")
    async def server_metadata() -> dict:
        return {"name": "fpet", "version": fpet.__version__, "extensions": ["binary_tensor_data", "classification"]}

    @app.get("/v2/models/{model}/ready", tags=["models"], summary="Model readiness (OIP v2)",
             responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})  # fmt: skip
    async def model_ready(model: str) -> dict:
        runner_for(model)
        check_serving()
        return {"name": model, "ready": True}

    @app.get("/models/{model}/labels", tags=["models"], summary="Class labels", responses={404: {"model": ErrorBody}})
    async def labels(model: str) -> list[str]:
        return runner_for(model).labels

    @app.get("/info", tags=["models"], summary="Server, settings and models")
    async def info() -> dict:
        import onnxruntime

        return {
            "name": "fpet", "version": fpet.__version__, "onnxruntime": onnxruntime.__version__,
            "available_providers": onnxruntime.get_available_providers(), "ready": state.ready,
            "draining": state.draining, "reason": state.reason or None, "default_model": settings.default_model,
            "limits": {"max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels,
                       "max_images": settings.max_images, "deadline_ms": settings.deadline_ms},
            "models": {n: metadata(r) for n, r in state.runners.items()},
        }  # fmt: skip

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})  # fmt: skip
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
