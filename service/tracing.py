"""Request traces over OTLP/HTTP (`FPET_OTLP_ENDPOINT`): a server span per request, continuing the caller's trace
when it sends a W3C `traceparent`, with a child span for each stage the request went through (admission, decode,
queue, inference). Stages are recorded as they happen (`mark`) and become spans once the answer is sent, so the
request path pays for a list append per stage, and nothing at all when tracing is off."""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import fpet

PROPAGATOR = TraceContextTextMapPropagator()


class Tracer:
    """Its own provider (not the global one): two apps in one process (tests) export to their own endpoints."""

    def __init__(self, endpoint: str, service_name: str = "fpet"):
        resource = Resource.create({"service.name": service_name, "service.version": fpet.__version__})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("fpet.service", fpet.__version__)
        # perf_counter times (what the stages record) as the epoch nanoseconds spans carry
        self.offset_ns = time.time_ns() - time.perf_counter_ns()

    def ns(self, perf: float) -> int:
        return int(perf * 1e9) + self.offset_ns

    def record(
        self,
        name: str,
        headers: dict[str, str],
        start: float,
        end: float,
        attributes: dict,
        stages: list[tuple[str, float, float]],
        failed: bool,
    ) -> None:
        """The request's span and its stages' spans, with the times they were measured at."""
        parent = PROPAGATOR.extract(headers)
        span = self.tracer.start_span(name, parent, SpanKind.SERVER, attributes, start_time=self.ns(start))
        context = trace.set_span_in_context(span)
        for stage, stage_start, stage_end in stages:
            child = self.tracer.start_span(stage, context, start_time=self.ns(stage_start))
            child.end(self.ns(stage_end))
        if failed:
            span.set_status(Status(StatusCode.ERROR))
        span.end(self.ns(end))

    def shutdown(self) -> None:
        self.provider.shutdown()  # exports what is still buffered
