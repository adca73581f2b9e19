"""Triton's statistics extension: per-model counts and cumulative nanoseconds of what was served.

Tools built for Triton read these rather than Prometheus: perf_analyzer splits its latency into queue and compute
from them, and asks for them before and after each measurement window. Counted per OIP model name (a variant, or
one task of a multi-task bundle), in this process: with `--workers N` each worker answers for its own requests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from service.oip import VERSION

# The service's request stages, as Triton names them: decoding and preprocessing make the input tensors.
STAGE_OF = {
    "queue": "queue",
    "decode": "compute_input",
    "preprocess": "compute_input",
    "inference": "compute_infer",
    "postprocess": "compute_output",
}
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


@dataclass
class ModelStats:
    inference_count: int = 0  # images answered
    execution_count: int = 0  # batches the graph ran (shared by the tasks of a multi-task bundle)
    last_inference_ms: int = 0
    durations: dict[str, list[int]] = field(default_factory=lambda: {name: [0, 0] for name in DURATIONS})
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, ns of compute_infer]

    def to_json(self, name: str) -> dict:
        return {
            "name": name,
            "version": VERSION,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {k: {"count": c, "ns": ns} for k, (c, ns) in self.durations.items()},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": count, "ns": 0},
                    "compute_infer": {"count": count, "ns": ns},
                    "compute_output": {"count": count, "ns": 0},
                }
                for size, (count, ns) in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class Statistics:
    """Written from the event loop, by requests and by the batchers' completions, and read by the routes; the lock
    keeps a reader from seeing half of an update wherever it is called from. Kept per
    variant and task; `register` gives the pairs that are OIP models their OIP name (a task of a multi-task bundle
    is one only on the default variant)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str | None], ModelStats] = {}
        self._names: dict[str, tuple[str, str | None]] = {}

    def register(self, variant: str, task: str | None, name: str | None) -> None:
        with self._lock:
            self._models.setdefault((variant, task), ModelStats())
            if name is not None:
                self._names[name] = (variant, task)

    def request(
        self, variant: str, task: str | None, ok: bool, seconds: float, images: int, timing_ms: dict[str, float]
    ) -> None:
        """One request answered: its outcome and total time, and for a success its stages and images."""
        with self._lock:
            stats = self._models.get((variant, task))
            if stats is None:
                return
            outcome = stats.durations["success" if ok else "fail"]
            outcome[0], outcome[1] = outcome[0] + 1, outcome[1] + int(seconds * 1e9)
            if not ok:
                return
            stats.inference_count += images
            stats.last_inference_ms = int(time.time() * 1000)
            for kind in set(STAGE_OF.values()):  # perf_analyzer requires equal compute counts: a stage
                stats.durations[kind][0] += 1  # a request skipped (pixel_values need no decoding) took 0 ns
            for stage, ms in timing_ms.items():
                if stage in STAGE_OF:
                    stats.durations[STAGE_OF[stage]][1] += int(ms * 1e6)

    def batch(self, variant: str, size: int, seconds: float) -> None:
        with self._lock:
            for (owner, _), stats in self._models.items():
                if owner == variant:
                    stats.execution_count += 1
                    entry = stats.batches.setdefault(size, [0, 0])
                    entry[0], entry[1] = entry[0] + 1, entry[1] + int(seconds * 1e9)

    def snapshot(self, names: list[str] | None = None) -> list[dict]:
        """The OIP models' statistics, by name (all of them without `names`)."""
        with self._lock:
            chosen = names if names is not None else sorted(self._names)
            return [self._models[self._names[name]].to_json(name) for name in chosen if name in self._names]
