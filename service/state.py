"""What the service holds while it runs, and its life: the bundles loaded and warmed, one batcher per model,
admission, readiness, and the drain."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from fpet import selfcheck
from fpet.paths import default_bundle_dir
from service import metrics, oip
from service.batcher import MicroBatcher
from service.errors import ServiceError
from service.runtime import ModelRunner
from service.settings import Settings
from service.statistics import Statistics

if TYPE_CHECKING:
    from service.repository import Status

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
        self.info_labels: dict[str, tuple[str, ...]] = {}  # each model's fpet_model_info series, replaced on a swap
        # One inference at a time per slot, across every model on the device: each batch's time is its own model's.
        self.device = asyncio.Semaphore(settings.instances)
        self.retiring: set[asyncio.Task] = set()  # versions swapped out, finishing what they hold (model control)
        self.control: dict[str, Status] = {}  # model control: models loading, unloaded, or whose last load failed
        self.control_lock = asyncio.Lock()
        self.shadows: set[asyncio.Task] = set()  # shadow runs in progress (service.shadow)
        self._store: Path | None = None
        self.ready = False
        self.unready: dict[str, str] = {}  # models loaded but not to be served, and why (a failed self-check)
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
        self.tracer = None
        if settings.otlp_endpoint:
            from service.tracing import Tracer  # OpenTelemetry only when traces are asked for

            self.tracer = Tracer(settings.otlp_endpoint)

    def store(self) -> Path:
        """Where model control unpacks the archives it loads: this process's own, removed at exit."""
        if self._store is None:
            self._store = Path(tempfile.mkdtemp(prefix="fpet-models-"))
        return self._store

    def remove_store(self) -> None:
        if self._store is not None:
            shutil.rmtree(self._store, ignore_errors=True)

    def owns(self, path: Path) -> bool:
        return self._store is not None and path.is_relative_to(self._store)

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
            raise ServiceError(
                404,
                "model_not_found",
                f"{name!r} serves several tasks, each an OIP model of its own: {', '.join(runner.tasks)}",
            )
        if version is not None and version != oip.VERSION:
            raise ServiceError(404, "model_not_found", f"{name} has no version {version!r}; it serves {oip.VERSION!r}")
        return runner, task

    def check_serving(self, model: str | None = None) -> None:
        """503 while loading, after a failure or draining; and for `model`, while it may not serve."""
        if self.draining:
            raise ServiceError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not self.ready:
            raise ServiceError(503, "not_ready", f"not ready: {self.reason}", {"Retry-After": "5"})
        if model is not None and model in self.unready:
            raise ServiceError(503, "not_ready", f"not ready: {self.unready[model]}", {"Retry-After": "5"})

    def model_ready(self, name: str) -> bool:
        return self.ready and not self.draining and name in self.runners and name not in self.unready

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready, self.reason = ready, reason
        metrics.serving().set(1 if ready and not self.unready else 0)
        for name in self.runners:
            metrics.READY.labels(name).set(1 if self.model_ready(name) else 0)

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


def open_model(state: State, path: str | Path, name: str | None = None) -> ModelRunner:
    """Load and warm one bundle (seconds: in a worker thread), served as `name` (default: its variant). Nothing of
    the service changes here: a bundle that fails to load or to warm up leaves what is served as it was."""
    settings = state.settings
    runner = ModelRunner(
        path, settings.providers, session_threads(settings), settings.runtime, settings.precision, settings.instances
    )
    runner.name = name or runner.name
    formats = runner.manifest.get("verification", {}).get("formats", {})
    if not all(result.get("passed", True) for result in formats.values()):
        raise ServiceError(400, "invalid_bundle", f"{path}: the bundle failed its own verification at export")
    runner.warm_up(state.max_batch(runner))
    runner.self_check(state.max_batch(runner))
    return runner


def selfcheck_failure(state: State, runner: ModelRunner) -> str | None:
    """Why the model must not serve, if its self-check failed (counted either way; with FPET_SELFCHECK=off it
    serves, with a warning)."""
    result = runner.selfcheck or {}
    if result.get("passed", True):
        if result.get("skipped"):
            log.warning("%s: %s", runner.name, result["skipped"])
        return None
    reason = f"{runner.name}: {selfcheck.summary(result)}"
    metrics.SELFCHECK_FAILURES.labels(runner.name).inc()
    if state.settings.selfcheck == "off":
        log.warning("%s (FPET_SELFCHECK=off: served anyway)", reason)
        return None
    log.error("%s: not ready", reason)
    return reason


def install(state: State, runner: ModelRunner) -> None:
    """Describe a loaded model in the metrics and statistics (a new version replaces the old one's description)."""
    name, settings = runner.name, state.settings
    metrics.initialise(name, list(runner.tasks))
    oip_tasks = name == settings.default_model  # state.target: tasks are the default variant's
    for task in runner.tasks or [None]:
        state.stats.register(name, task, name if task is None else task if oip_tasks else None)
    old = state.info_labels.pop(name, None)
    if old is not None:
        metrics.INFO.remove(*old)
    m = runner.manifest
    labels = (
        name,
        m["version"],
        m["backbone"]["name"],
        runner.provider,
        m["precision"],
        m["schedule"],
        runner.runtime,
        runner.precision,
        ",".join(runner.cpu_features),
    )
    metrics.INFO.labels(*labels).set(1)
    state.info_labels[name] = labels
    metrics.GFLOPS.labels(name).set(2 * m["gmacs"])
    metrics.LOAD_SECONDS.labels(name).set(runner.load_seconds)
    metrics.WARMUP_SECONDS.labels(name).set(runner.warmup_seconds)
    if runner.fell_back:
        metrics.FALLBACKS.labels(name).inc()
    log.info(
        "%s ready on %s, %s (%s; load %.1f s, warm-up %.1f s)",
        name,
        runner.provider,
        runner.precision,
        runner.runtime_reason,
        runner.load_seconds,
        runner.warmup_seconds,
    )


def check_task_names(state: State, runners: dict[str, ModelRunner]) -> None:
    """A task is an OIP model of its own: its name must not also name a variant."""
    default = runners.get(state.settings.default_model)
    clash = sorted(set(default.tasks) & set(runners)) if default is not None else []
    if clash:
        raise ServiceError(400, "invalid_bundle", f"task {clash[0]!r} has the name of a served variant: rename it")


def load(state: State) -> None:
    """Load and warm every bundle (in a worker thread: this takes seconds). A model whose self-check fails is loaded
    but not ready; the others serve."""
    for path in bundle_paths(state.settings):
        runner = open_model(state, path)
        if runner.name in state.runners:
            raise ServiceError(500, "internal_error", f"two bundles serve the variant {runner.name!r}")
        check_task_names(state, {**state.runners, runner.name: runner})
        state.runners[runner.name] = runner
        install(state, runner)
        failure = selfcheck_failure(state, runner)
        if failure is not None:
            state.unready[runner.name] = failure


def session_threads(settings: Settings) -> int:
    """One instance keeps onnxruntime's own choice; several share the cores instead of each taking them all."""
    if settings.threads or settings.instances == 1:
        return settings.threads
    return max(1, available_cores() // settings.instances)


def start_batcher(state: State, runner: ModelRunner) -> MicroBatcher:
    """A batcher (and its worker threads) for one loaded model, sharing the device's slots with every other."""
    settings, name = state.settings, runner.name
    executor = ThreadPoolExecutor(max_workers=settings.instances, thread_name_prefix=f"infer-{name}")

    def on_batch(size: int, seconds: float) -> None:
        metrics.BATCH_SECONDS.labels(name, runner.provider).observe(seconds)
        metrics.BATCH_SIZE.labels(name).observe(size)
        metrics.BATCHES.labels(name).inc()
        metrics.IMAGES.labels(name).inc(size)
        state.stats.batch(name, size, seconds)

    batcher = MicroBatcher(
        runner.run,
        executor,
        max_batch=state.max_batch(runner),
        max_delay=settings.max_delay_ms / 1000,
        max_queue=settings.max_queue_images,
        instances=settings.instances,
        on_batch=on_batch,
        on_queue=lambda depth: metrics.QUEUE_IMAGES.labels(name).set(depth),
        on_failure=lambda reason: state.set_ready(False, f"{name}: {reason}"),
        device=state.device,
    )
    batcher.start()
    return batcher


def start_batchers(state: State) -> None:
    for name, runner in state.runners.items():
        state.batchers[name] = start_batcher(state, runner)


async def drain(state: State) -> None:
    """Run what is queued (up to the drain timeout), answer what is left with 503, release the threads."""
    if not state.draining:
        state.begin_drain()
    await asyncio.gather(*(b.stop(state.settings.drain_timeout_s) for b in state.batchers.values()))
    await asyncio.gather(*state.retiring, return_exceptions=True)
    for executor in [*(b.executor for b in state.batchers.values()), state.decode_pool]:
        executor.shutdown(wait=False)
    state.remove_store()
