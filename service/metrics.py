"""Prometheus metrics, named as the serving conventions say. Labels only from closed sets (configured variants,
providers, stages, status codes, error types): never a request id, a file name or a predicted class.

With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR (`fpet serve --workers N` does, and wipes it at
start); gauges then carry a multiprocess mode and /metrics aggregates every worker's files.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (
    *(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075),  # a batch, 1 to 75 ms
    *(0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10),  # a request under load, up to the deadline's order
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STAGES = ("decode", "preprocess", "queue", "inference", "postprocess")
REASONS = (
    "invalid_image",
    "invalid_request",
    "unauthorized",
    "payload_too_large",
    "unsupported_media_type",
    "validation_error",
    "overloaded",
    "not_ready",
    "shutting_down",
    "timeout",
    "internal_error",
    "cancelled",
)

REQUESTS = Counter("fpet_requests", "Requests by status code (499: cancelled, never answered)", ["model", "code"])
ERRORS = Counter("fpet_request_errors", "Requests answered with an error", ["model", "reason"])
REQUEST_SECONDS = Histogram(
    "fpet_request_duration_seconds", "End-to-end request latency", ["model", "provider"], buckets=LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "fpet_stage_duration_seconds", "Per-request time by stage", ["model", "stage"], buckets=LATENCY_BUCKETS
)
BATCH_SECONDS = Histogram(
    "fpet_batch_inference_duration_seconds",
    "Inference time per batch, from when it has a device slot (FPET_INSTANCES)",
    ["model", "provider"],
    buckets=LATENCY_BUCKETS,
)
TASK_REQUESTS = Counter(
    "fpet_task_requests", "Requests answered, by task of a multi-task model", ["model", "task", "code"]
)  # task names come only from the served bundles' manifests: a closed set
TASK_REQUEST_SECONDS = Histogram(
    "fpet_task_request_duration_seconds",
    "End-to-end request latency by task",
    ["model", "task"],
    buckets=LATENCY_BUCKETS,
)
IMAGES = Counter("fpet_images", "Images classified", ["model"])
BATCHES = Counter("fpet_batches", "Batches run", ["model"])
BATCH_SIZE = Histogram("fpet_batch_size", "Images per batch", ["model"], buckets=BATCH_BUCKETS)
QUEUE_IMAGES = Gauge("fpet_queue_images", "Images waiting for a batch", ["model"], multiprocess_mode="livesum")
IN_FLIGHT = Gauge("fpet_requests_in_flight", "Requests being handled", ["model"], multiprocess_mode="livesum")
READY = Gauge("fpet_model_ready", "1 when the model is loaded and warm", ["model"], multiprocess_mode="livemin")
INFO = Gauge(
    "fpet_model_info",
    "Served model: `precision` is the bundle's, `compute_precision` what the runtime computes in",
    [
        "model",
        "version",
        "backbone",
        "provider",
        "precision",
        "schedule",
        "runtime",
        "compute_precision",
        "cpu_features",
    ],
    multiprocess_mode="liveall",
)
GFLOPS = Gauge(
    "fpet_model_gflops_per_image", "Analytic GFLOPs (2 x GMACs) per image", ["model"], multiprocess_mode="max"
)
LOAD_SECONDS = Gauge("fpet_model_load_duration_seconds", "Model load time", ["model"], multiprocess_mode="max")
WARMUP_SECONDS = Gauge("fpet_model_warmup_duration_seconds", "Warm-up time", ["model"], multiprocess_mode="max")
FALLBACKS = Counter("fpet_execution_provider_fallback", "CUDA asked for, CPU given by onnxruntime", ["model"])
SELFCHECK_FAILURES = Counter(
    "fpet_selfcheck_failures",
    "Bundles whose self-check failed on this runtime as they loaded (FPET_SELFCHECK=off: served anyway)",
    ["model"],
)
MODEL_LOADS = Counter(
    "fpet_model_loads", "Model-control loads, by outcome (success, failure)", ["model", "outcome"]
)  # model names come from the admin's loads: a closed set in practice
SHADOW = Counter(
    "fpet_shadow_requests",
    "Images of the default variant's requests also run on the reference variant, by whether their top-1 agreed",
    ["model", "reference", "agree"],
)
SHADOW_DROPPED = Counter(
    "fpet_shadow_dropped", "Shadow runs not made: the service was busy, or the reference was not served", ["reason"]
)
BUILD = Gauge("fpet_build_info", "Build", ["version", "git_sha", "onnxruntime"], multiprocess_mode="max")


@functools.cache
def serving() -> Gauge:
    """No labels, so it exists before any model has loaded (a load that fails leaves no fpet_model_ready series to
    alert on). Made on first use, in the serving process: an unlabelled gauge opens its multiprocess file at once,
    and at import `fpet serve --workers N` has not yet made the folder."""
    return Gauge("fpet_ready", "1 when the service answers /readyz with 200", multiprocess_mode="livemin")


def initialise(model: str, tasks: list[str]) -> None:
    """Create every labelled series of a model at zero, so dashboards and alerts see 0 rather than nothing."""
    for reason in REASONS:
        ERRORS.labels(model, reason)
    FALLBACKS.labels(model)
    SELFCHECK_FAILURES.labels(model)
    for task in tasks:
        TASK_REQUESTS.labels(model, task, "200")


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
