"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, as Triton serves it on port 8001), and
`grpc.health.v1`, on the service's own event loop: the same admission, limits, batcher, metrics, readiness and
drain as HTTP. The message types and the service stubs are the ones `tritonclient` ships, so nothing is compiled
here; repository control is answered UNIMPLEMENTED (the service loads its bundles at start)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

import fpet
from service import inference, oip
from service.context import RequestContext
from service.errors import ServiceError
from service.observed import observed, wanted
from service.routes.models import metadata
from service.routes.triton import model_config
from service.runtime import ModelRunner, Task
from service.settings import Settings
from service.state import State

log = logging.getLogger("fpet.service")
HEALTH_SERVICE = "inference.GRPCInferenceService"
ROUTE = f"/{HEALTH_SERVICE}/ModelInfer"  # how an inference call shows in access records and traces
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def call_context(call: grpc.aio.ServicerContext, settings: Settings) -> RequestContext:
    """A gRPC call's request context: its metadata as headers (the API key, a request id) with the call's own deadline
    as X-Request-Timeout-Ms."""
    headers = {key.lower(): value for key, value in call.invocation_metadata() or () if isinstance(value, str)}
    remaining = call.time_remaining()
    if remaining is not None:
        headers["x-request-timeout-ms"] = str(max(remaining, 0.0) * 1000)
    request_id = headers.get("x-request-id") or uuid.uuid4().hex
    return RequestContext(request_id, headers, settings.deadline_ms, marks=[])


def access_fields(context: RequestContext, call: grpc.aio.ServicerContext, status: grpc.StatusCode, response) -> dict:
    """The call's access record, in the fields an HTTP request's has (service.observed)."""
    return {
        "request_id": context.request_id,
        "method": "gRPC",
        "route": ROUTE,
        "path": ROUTE,
        "model": context.model,
        "task": context.task,
        "status": status.name,
        "bytes": response.ByteSize() if response is not None else 0,
        "stages_ms": {k: round(v, 3) for k, v in context.timing.items() if k != "total"},
        "client": call.peer(),
    }


def parse_infer(message: service_pb2.ModelInferRequest, img_size: int) -> oip.InferRequest:
    """A ModelInferRequest as the protocol module's request, through its checks: the input as typed contents or as
    raw_input_contents (Triton's BYTES layout for `image`, little-endian floats for `pixel_values`)."""
    if len(message.inputs) != 1:
        raise oip.bad(
            f"give exactly one input: {oip.IMAGE!r} (BYTES, encoded images) or {oip.PIXELS!r} (FP32, preprocessed)"
        )
    tensor = message.inputs[0]
    if len(message.raw_input_contents) > 1:
        raise oip.bad("raw_input_contents must hold one entry, for the one input")
    raw = message.raw_input_contents[0] if message.raw_input_contents else None
    head = {"datatype": tensor.datatype, "shape": list(tensor.shape)}
    images = pixels = None
    if tensor.name == oip.IMAGE:
        images = oip.read_images(head, raw if raw is not None else oip.serialize_bytes(tensor.contents.bytes_contents))
    elif tensor.name == oip.PIXELS:
        if raw is None:
            if tensor.datatype != "FP32":
                raise oip.bad(f"input {oip.PIXELS!r} as typed contents must be FP32 (fp32_contents)")
            raw = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        pixels = oip.read_pixels(head, raw, img_size)
    else:
        raise oip.bad(f"unknown input {tensor.name!r}; inputs: {oip.IMAGE!r} (BYTES) or {oip.PIXELS!r} (FP32)")
    outputs = []
    for asked in message.outputs:
        if asked.name not in oip.OUTPUTS:
            raise oip.bad(f"unknown output {asked.name!r}; outputs: {', '.join(oip.OUTPUTS)}")
        k = asked.parameters["classification"].int64_param if "classification" in asked.parameters else 0
        if k < 0:
            raise oip.bad(f"output {asked.name!r}: `classification` must be a non-negative integer")
        outputs.append(oip.Requested(asked.name, True, k))
    outputs = outputs or [oip.Requested(name, True) for name in oip.OUTPUTS]
    return oip.InferRequest(message.id or None, images, pixels, outputs)


def infer_response(
    name: str, parsed: oip.InferRequest, logits: np.ndarray, task: Task
) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=name, model_version=oip.VERSION, id=parsed.id or "")
    for tensor in oip.output_tensors(parsed, logits, task.labels):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.raw)
    return response


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls, by their protobuf names."""

    def __init__(self, state: State):
        self.state = state

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        ready = self.state.ready and not self.state.draining and not self.state.unready  # as /readyz
        return service_pb2.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request, context):
        """False, not an error, for a model or version that is not served: as HTTP's /ready answers tritonclient."""
        try:
            runner = self.state.oip_model(request.name, request.version or None)[0]
        except ServiceError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self.state.model_ready(runner.name))

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="fpet", version=fpet.__version__, extensions=oip.EXTENSIONS)

    async def ModelMetadata(self, request, context):
        async def describe() -> service_pb2.ModelMetadataResponse:
            runner = self.state.oip_model(request.name, request.version or None)[0]
            found = metadata(self.state, runner, request.name if runner.tasks else None)
            tensors = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=request.name,
                versions=found["versions"],
                platform=found["platform"],
                inputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in found["inputs"]],
                outputs=[tensors(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in found["outputs"]],
            )

        return await self.answer(context, describe)

    async def ModelConfig(self, request, context):
        async def config() -> service_pb2.ModelConfigResponse:
            runner = self.state.oip_model(request.name, request.version or None)[0]
            found = model_config(self.state, runner, request.name)
            return service_pb2.ModelConfigResponse(config=json_format.ParseDict(found, model_config_pb2.ModelConfig()))

        return await self.answer(context, config)

    async def ModelStatistics(self, request, context):
        async def statistics() -> service_pb2.ModelStatisticsResponse:
            names = None
            if request.name:
                self.state.oip_model(request.name, request.version or None)[0]
                names = [request.name]
            found = {"model_stats": self.state.stats.snapshot(names)}
            return json_format.ParseDict(found, service_pb2.ModelStatisticsResponse())

        return await self.answer(context, statistics)

    async def RepositoryIndex(self, request, context):
        index = service_pb2.RepositoryIndexResponse()
        for entry in self.state.stats.snapshot():
            index.models.add(
                name=entry["name"], version=oip.VERSION, state="READY" if self.state.ready else "UNAVAILABLE"
            )
        return index

    async def ModelInfer(self, request, context):
        call = call_context(context, self.state.settings)

        async def read(runner: ModelRunner) -> oip.InferRequest:
            return parse_infer(request, runner.img_size)

        def answer(parsed: oip.InferRequest, logits: np.ndarray, task: Task) -> service_pb2.ModelInferResponse:
            return infer_response(request.model_name, parsed, logits, task)

        async def run() -> service_pb2.ModelInferResponse:
            self.state.in_flight += 1  # the drain waits for gRPC calls as for HTTP requests
            self.state.last_arrival = time.monotonic()
            status, response = grpc.StatusCode.OK, None
            try:
                response = await inference.infer(
                    call, self.state, request.model_name, request.model_version or None, read, answer
                )
                return response
            except ServiceError as exc:
                status = CODES.get(exc.status, grpc.StatusCode.INTERNAL)
                raise
            except BaseException:
                status = grpc.StatusCode.INTERNAL
                raise
            finally:
                self.state.in_flight -= 1
                if wanted(self.state):
                    fields = access_fields(call, context, status, response)
                    failed = status == grpc.StatusCode.INTERNAL
                    observed(self.state, fields, call.headers, call.start, time.perf_counter(), call.marks, failed)

        return await self.answer(context, run)

    async def answer(self, context: grpc.aio.ServicerContext, work):
        """A ServiceError becomes its gRPC status with the same message; anything else is INTERNAL, logged."""
        try:
            return await work()
        except ServiceError as exc:
            await context.abort(CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1's Check, read from the service's readiness as it is now (what /readyz answers), for the server
    ("") and the inference service by name."""

    def __init__(self, state: State):
        self.state = state

    async def Check(self, request, context):
        if request.service not in ("", HEALTH_SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        serving = self.state.ready and not self.state.draining and not self.state.unready
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


class GrpcServer:
    """The gRPC server's life beside uvicorn's: it stops taking calls as soon as the drain begins (clients see
    GOAWAY and reconnect elsewhere, as HTTP clients do after `Connection: close`), and the calls it had already taken
    are answered, for up to the drain timeout, before the batchers stop."""

    def __init__(self, server: grpc.aio.Server, grace: float):
        self.server, self.grace = server, grace
        self.stopping: asyncio.Task | None = None

    @classmethod
    async def start(cls, state: State, port: int, host: str) -> GrpcServer:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", state.settings.max_bytes),
                ("grpc.max_send_message_length", 64 * 2**20),
                ("grpc.so_reuseport", 0),  # a port another server holds is an error, not silently shared traffic
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
        health_pb2_grpc.add_HealthServicer_to_server(Health(state), server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {host}:{port}: {exc}") from None
        await server.start()
        log.info("gRPC (inference.GRPCInferenceService, grpc.health.v1) on %s:%d", host, bound)
        running = cls(server, state.settings.drain_timeout_s)
        state.drain_hooks.append(running.begin_stop)
        return running

    def begin_stop(self) -> None:
        if self.stopping is None:
            self.stopping = asyncio.ensure_future(self.server.stop(grace=self.grace))

    async def stop(self) -> None:
        self.begin_stop()
        await self.stopping
