"""Model control (Triton's `explicit` mode): load, swap and unload models while the service runs.

A load builds the new version beside the one serving (session, warm-up of every batch size) and swaps it in at one
point of the event loop: requests admitted before the swap finish on the old version, requests after it go to the
new one, and the old version is retired once what it holds is answered. A load that fails changes nothing that is
served; the index says why.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from export.bundle import is_bundle, read_manifest
from export.pull import pull_bundles
from fpet.errors import FpetError
from service import metrics, oip
from service.batcher import MicroBatcher
from service.errors import ServiceError
from service.runtime import ModelRunner
from service.state import State, check_task_names, install, open_model, selfcheck_failure, start_batcher

log = logging.getLogger("fpet.service")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


@dataclass
class Status:
    """A model's state in the index when it is not simply serving: loading, unloaded, or its last load failed."""

    state: str
    reason: str = ""


def index(state: State, ready_only: bool = False) -> list[dict]:
    """Every model the service serves or was asked about, as Triton's repository index lists them."""
    entries = []
    for name in sorted({*state.runners, *state.control}):
        runner, status = state.runners.get(name), state.control.get(name)
        if runner is not None:
            reason = state.unready.get(name) or (status.reason if status else ("" if state.ready else state.reason))
            entry = {
                "name": name,
                "version": oip.VERSION,
                "state": READY if state.model_ready(name) else UNAVAILABLE,
                "reason": reason,
                "bundle_version": runner.manifest["version"],
            }
        else:
            entry = {"name": name, "version": oip.VERSION, "state": status.state, "reason": status.reason}
        if not ready_only or entry["state"] == READY:
            entries.append(entry)
    return entries


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ServiceError(
            400,
            "invalid_request",
            f"model name {name[:80]!r}: use letters, digits, '_', '.' or '-' "
            "(at most 64, starting with a letter or digit)",
        )


def resolve(state: State, name: str, uri: str | None) -> Path:
    """The bundle folder a load means: the URI's (a bundle folder is used where it is; an archive, local or over
    http(s), is unpacked into the service's own store), or, without one, the folder the model was loaded from."""
    if uri is None:
        if name not in state.runners:
            raise ServiceError(400, "invalid_request", f"{name!r} is not served: give parameters.uri, the bundle")
        return state.runners[name].bundle
    local = Path(uri.removeprefix("file://")) if "://" not in uri or uri.startswith("file://") else None
    if local is not None and local.is_dir() and is_bundle(local):
        return local
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=state.store()))
    try:
        bundles = pull_bundles(uri, target, log=log.info)
    except FpetError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if len(bundles) == 1:
        return bundles[0]
    named = [b for b in bundles if b.name == name or read_manifest(b)["variant"] == name]
    if len(named) != 1:
        shutil.rmtree(target, ignore_errors=True)
        raise FpetError(
            f"{uri} holds {len(bundles)} bundles ({', '.join(b.name for b in bundles)}); none is "
            f"named {name!r} (by folder or variant)"
        )
    return named[0]


async def load(state: State, name: str, uri: str | None) -> ModelRunner:
    """Load (or reload) `name` from `uri` and swap it in; one load at a time."""
    check_name(name)
    async with state.control_lock:
        served = name in state.runners
        state.control[name] = Status(LOADING, f"loading {uri or 'again'}")
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(resolve, state, name, uri)
            runner = await asyncio.to_thread(open_model, state, path, name)
            check_task_names(state, {**state.runners, name: runner})
            failure = selfcheck_failure(state, runner)
            if failure is not None:
                raise ServiceError(400, "selfcheck_failed", failure)
        except Exception as exc:
            message = exc.message if isinstance(exc, ServiceError) else str(exc)
            reason = f"load of {uri or name} failed: {message}"
            state.control[name] = Status(READY if served else UNAVAILABLE, reason)
            metrics.MODEL_LOADS.labels(name, "failure").inc()
            log.error("%s", reason)
            raise ServiceError(400, "load_failed", reason) from None
        swap(state, runner)
        metrics.MODEL_LOADS.labels(name, "success").inc()
        log.info(
            "%s: version %s in service (%.1f s to load and warm)",
            name,
            runner.manifest["version"],
            time.perf_counter() - started,
        )
        return runner


def swap(state: State, runner: ModelRunner) -> None:
    """On the event loop, with no await: no request sees one model's runner with another's batcher."""
    name = runner.name
    old = state.batchers.get(name), state.runners.get(name)
    batcher = start_batcher(state, runner)
    state.runners[name], state.batchers[name] = runner, batcher
    state.control.pop(name, None)
    state.unready.pop(name, None)  # the new version passed its self-check
    install(state, runner)
    state.set_ready(state.ready, state.reason)
    if old[0] is not None:
        retire(state, *old)


async def unload(state: State, name: str) -> None:
    async with state.control_lock:
        if name not in state.runners:
            raise ServiceError(
                404, "model_not_found", f"no model {name!r} is served; served: {', '.join(state.runners) or 'none'}"
            )
        runner, batcher = state.runners.pop(name), state.batchers.pop(name)
        state.control[name] = Status(UNAVAILABLE, "unloaded")
        state.unready.pop(name, None)
        metrics.READY.labels(name).set(0)
        state.set_ready(state.ready, state.reason)
        metrics.INFO.remove(*state.info_labels.pop(name))
        retire(state, batcher, runner)
        log.info("%s: unloaded", name)


def retire(state: State, batcher: MicroBatcher, runner: ModelRunner) -> None:
    """Let the old version answer what it holds, then free its threads (and its unpacked files, if the service
    unpacked them)."""

    def freed(task: asyncio.Task) -> None:
        state.retiring.discard(task)
        batcher.executor.shutdown(wait=False)
        if state.owns(runner.bundle) and all(r.bundle != runner.bundle for r in state.runners.values()):
            shutil.rmtree(runner.bundle.parent, ignore_errors=True)

    task = asyncio.get_running_loop().create_task(batcher.retire(state.settings.drain_timeout_s))
    state.retiring.add(task)
    task.add_done_callback(freed)
