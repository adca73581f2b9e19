"""What the service holds while it runs, and its life: the bundles loaded and warmed, one batcher per model,
admission, readiness, and the drain."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from fpet.paths import default_bundle_dir
from service import metrics, oip
from service.batcher import MicroBatcher
from service.errors import ServiceError
from service.runtime import ModelRunner
from service.settings import Settings
from service.statistics import Statistics

log = logging.getLogger("fpet.service")
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" without a CPU limit


def available_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota. In a pod os.cpu_count()
    is the node's count: a 2-CPU pod on a 16-core node would decode 16 images at once (and hold them in memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 file (not Linux, cgroup v1): the affinity stands
    return cores


class State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.runners: dict[str, ModelRunner] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.executors: list[ThreadPoolExecutor] = []
        self.ready = False
        self.draining = False
        self.reason = "loading models"
        metrics.serving().set(0)
        # Images decoded or preprocessed at once: as many as there are cores, whatever the load. Its own threads
        # rather than asyncio's default pool: no context copy per call, and they show by name in a profile.
        self.decode_pool = ThreadPoolExecutor(available_cores(), "decode")
        self.explain_slots = asyncio.Semaphore(settings.explain_concurrency)
        self.stats = Statistics()
        self.in_flight = 0
        self.last_arrival = 0.0
        self.drain_hooks: list[Callable[[], object]] = []  # called as the drain begins (the gRPC server's stop)

    def max_batch(self, runner: ModelRunner) -> int:
        return self.settings.max_batch_size or (32 if runner.on_gpu else 8)

    def runner(self, model: str) -> ModelRunner:
        if model not in self.runners:
            if not self.runners:
                self.check_serving()  # nothing loaded (still loading, or the load failed): 503 and why, not 404
            raise ServiceError(404, "model_not_found", f"no model {model!r}; served: {', '.join(self.runners)}")
        return self.runners[model]

    def target(self, name: str) -> tuple[str, str | None]:
        """What a model name means: a served variant, or a task of the default variant's multi-task bundle."""
        if name in self.runners:
            return name, None
        default = self.runners.get(self.settings.default_model)
        if default is not None and name in default.tasks:
            return default.name, name
        return name, None  # not served: state.runner says so

    def oip_model(self, name: str, version: str | None) -> tuple[ModelRunner, str | None]:
        """What an Open Inference Protocol model name means: a variant, or a task of the default variant's
        multi-task bundle (whose variant name then names no OIP model), at the protocol's one version."""
        variant, task = self.target(name)
        runner = self.runner(variant)
        if runner.tasks and task is None:
            raise ServiceError(404, "model_not_found", f"{name!r} serves several tasks, each an OIP model of its own: "
                                                       f"{', '.join(runner.tasks)}")  # fmt: skip
        if version is not None and version != oip.VERSION:
            raise ServiceError(404, "model_not_found", f"{name} has no version {version!r}; it serves {oip.VERSION!r}")
        return runner, task

    def check_serving(self) -> None:
        if self.draining:
            raise ServiceError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not self.ready:
            raise ServiceError(503, "not_ready", f"not ready: {self.reason}", {"Retry-After": "5"})

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready, self.reason = ready, reason
        metrics.serving().set(1 if ready else 0)
        for name in self.runners:
            metrics.READY.labels(name).set(1 if ready else 0)

    def begin_drain(self) -> None:
        """On the event loop, never in a signal handler: prometheus_client's locks are not re-entrant."""
        self.draining = True
        self.set_ready(False, "shutting down")
        for hook in self.drain_hooks:
            hook()

    def quiet_since(self, seconds: float) -> bool:
        """No request running and none arrived for `seconds`: what was sent before a SIGTERM has been answered."""
        return self.in_flight == 0 and time.monotonic() - self.last_arrival >= seconds


async def get_state(request: Request) -> State:
    """Async on purpose: FastAPI runs a plain-def dependency in its thread pool, a thread hop on every request."""
    return request.app.state.fpet


StateDep = Annotated[State, Depends(get_state)]


def bundle_paths(settings: Settings) -> list[str]:
    return settings.bundles or [str(default_bundle_dir(v)) for v in ("fpet", "backbone")]


def load(state: State) -> None:
    """Load and warm every bundle (in a worker thread: this takes seconds)."""
    settings = state.settings
    for path in bundle_paths(settings):
        runner = ModelRunner(path, settings.providers, session_threads(settings), settings.runtime, settings.precision,
                             settings.instances)  # fmt: skip
        if runner.name in state.runners:
            raise ServiceError(500, "internal_error", f"two bundles serve the variant {runner.name!r}")
        runner.warm_up(state.max_batch(runner))
        state.runners[runner.name] = runner
        metrics.initialise(runner.name, list(runner.tasks))
        oip_tasks = runner.name == settings.default_model  # state.target: tasks are the default variant's
        for task in runner.tasks or [None]:
            state.stats.register(runner.name, task, runner.name if task is None else task if oip_tasks else None)
        m = runner.manifest
        metrics.INFO.labels(runner.name, m["version"], m["backbone"]["name"], runner.provider, m["precision"],
                            m["schedule"], runner.runtime, runner.precision,
                            ",".join(runner.cpu_features)).set(1)  # fmt: skip
        metrics.GFLOPS.labels(runner.name).set(2 * m["gmacs"])
        metrics.LOAD_SECONDS.labels(runner.name).set(runner.load_seconds)
        metrics.WARMUP_SECONDS.labels(runner.name).set(runner.warmup_seconds)
        if runner.fell_back:
            metrics.FALLBACKS.labels(runner.name).inc()
        log.info("%s ready on %s, %s (%s; load %.1f s, warm-up %.1f s)", runner.name, runner.provider,
                 runner.precision, runner.runtime_reason, runner.load_seconds, runner.warmup_seconds)  # fmt: skip
    default = state.runners.get(settings.default_model)
    clash = sorted(set(default.tasks) & set(state.runners)) if default is not None else []
    if clash:  # a task is an OIP model of its own: its name must not also name a variant
        raise ServiceError(500, "internal_error", f"task {clash[0]!r} has the name of a served variant: rename it")


def session_threads(settings: Settings) -> int:
    """One instance keeps onnxruntime's own choice; several share the cores instead of each taking them all."""
    if settings.threads or settings.instances == 1:
        return settings.threads
    return max(1, available_cores() // settings.instances)


def start_batchers(state: State) -> None:
    settings = state.settings
    for name, runner in state.runners.items():
        executor = ThreadPoolExecutor(max_workers=settings.instances, thread_name_prefix=f"infer-{name}")
        state.executors.append(executor)

        def on_batch(size: int, seconds: float, name: str = name, provider: str = runner.provider) -> None:
            metrics.BATCH_SECONDS.labels(name, provider).observe(seconds)
            metrics.BATCH_SIZE.labels(name).observe(size)
            metrics.BATCHES.labels(name).inc()
            metrics.IMAGES.labels(name).inc(size)
            state.stats.batch(name, size, seconds)

        batcher = MicroBatcher(
            runner.run, executor, max_batch=state.max_batch(runner), max_delay=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue_images, instances=settings.instances, on_batch=on_batch,
            on_queue=lambda depth, name=name: metrics.QUEUE_IMAGES.labels(name).set(depth),
            on_failure=lambda reason, name=name: state.set_ready(False, f"{name}: {reason}"),
        )  # fmt: skip
        batcher.start()
        state.batchers[name] = batcher


async def drain(state: State) -> None:
    """Run what is queued (up to the drain timeout), answer what is left with 503, release the threads."""
    if not state.draining:
        state.begin_drain()
    await asyncio.gather(*(b.stop(state.settings.drain_timeout_s) for b in state.batchers.values()))
    for executor in [*state.executors, state.decode_pool]:
        executor.shutdown(wait=False)
