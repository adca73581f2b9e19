"""The FastAPI application: the routers, the request context, errors as one JSON shape, the offline API docs, and
the lifespan (load, warm, serve, drain).

The service imports no training code and runs no PyTorch: it serves ONNX bundles with onnxruntime, and what it must
share with training (preprocessing, labels, input size) comes from each bundle's manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fpet
from service import lifecycle, metrics, shadow
from service.context import RequestContext
from service.errors import ServiceError
from service.observed import observed, wanted
from service.routes import classify, explain, health, models, oip, page, repository, triton
from service.settings import Settings
from service.state import State, drain, load, start_batchers

log = logging.getLogger("fpet.service")
DOCS_ASSETS = "/docs/assets"  # Swagger UI served by the service itself: /docs works without internet


def request_id_of(request: Request) -> str | None:
    context = getattr(request.state, "context", None)
    return context.request_id if context is not None else None


def error_response(request: Request, status: int, error_type: str, message: str, headers=None) -> JSONResponse:
    body = {"error": message, "error_type": error_type, "request_id": request_id_of(request)}
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
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
        rid = request_id_of(request)
        log.exception("request %s failed", rid)
        return error_response(request, 500, "internal_error", f"internal error; quote request id {rid} to the operator")


def add_offline_docs(app: FastAPI) -> None:
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )


class RequestContextMiddleware:
    """Each request's context (service.context), made once as it arrives; the request id and Server-Timing on every
    answer, `Connection: close` on every answer while draining, the in-flight count the drain waits on, and, when
    asked for, the request's JSON access record and its trace. Plain ASGI: Starlette's BaseHTTPMiddleware costs a
    task and a stream per request, which under overload is CPU taken from inference."""

    def __init__(self, app: ASGIApp, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        context = RequestContext(
            request_id,
            headers,
            self.state.settings.deadline_ms,
            marks=[] if self.state.tracer is not None else None,
        )
        scope.setdefault("state", {})["context"] = context
        timing, start = context.timing, context.start
        answer = {"status": 500, "bytes": 0}

        async def send_with_context(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                timing.setdefault("total", (time.perf_counter() - start) * 1000)
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-Id", request_id)
                headers.append("Server-Timing", ", ".join(f"{k};dur={v:.2f}" for k, v in timing.items()))
                if self.state.draining:
                    headers["Connection"] = "close"
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        self.state.in_flight += 1
        self.state.last_arrival = time.monotonic()
        try:
            await self.app(scope, receive, send_with_context)
        finally:
            self.state.in_flight -= 1
            if wanted(self.state):
                self.record(scope, context, answer)

    def record(self, scope: Scope, context: RequestContext, answer: dict) -> None:
        route = scope.get("route")
        fields = {
            "request_id": context.request_id,
            "method": scope["method"],
            "route": getattr(route, "path", None) or scope["path"],
            "path": scope["path"],
            "model": context.model,
            "task": context.task,
            "status": answer["status"],
            "bytes": answer["bytes"],
            "stages_ms": {k: round(v, 3) for k, v in context.timing.items() if k != "total"},
            "client": f"{scope['client'][0]}:{scope['client'][1]}" if scope.get("client") else None,
        }
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        end = time.perf_counter()
        observed(self.state, fields, headers, context.start, end, context.marks or [], answer["status"] >= 500)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        import onnxruntime

        metrics.BUILD.labels(fpet.__version__, "unknown", onnxruntime.__version__).set(1)
        lifecycle.register(state)
        try:
            await asyncio.to_thread(load, state)
        except Exception as exc:
            log.exception("could not load the models")
            state.set_ready(False, f"could not load the models: {exc}")
            yield
            lifecycle.unregister(state)
            return
        start_batchers(state)
        shadow.initialise(state)
        grpc_server = None
        if settings.grpc_port is not None:
            from service.grpc_server import GrpcServer  # grpcio only when gRPC is asked for

            grpc_server = await GrpcServer.start(state, settings.grpc_port, settings.host)
        fallbacks = [n for n, r in state.runners.items() if r.fell_back]
        if fallbacks and not settings.allow_cpu_fallback:
            fell_back = ", ".join(fallbacks)
            state.set_ready(False, f"{fell_back} fell back from CUDA to CPU and FPET_ALLOW_CPU_FALLBACK is off")
        else:
            state.set_ready(True)
        yield
        if grpc_server is not None:  # calls in progress finish while the batchers still run
            await grpc_server.stop()
        await drain(state)
        lifecycle.unregister(state)
        if state.tracer is not None:
            state.tracer.shutdown()

    app = FastAPI(
        title="FPET image classification",
        version=fpet.__version__,
        description="Classify images with an FPET-tuned ViT and compare it with the same model without token merging.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.fpet = state

    app.add_middleware(RequestContextMiddleware, state=state)
    add_error_handlers(app)
    for router in (
        classify.router,
        explain.router,
        oip.router,
        triton.router,
        repository.router,
        models.router,
        health.router,
        page.router,
    ):  # triton before models: /v2/models/stats is not a model
        app.include_router(router)
    add_offline_docs(app)
    page.mount_static(app)
    return app
