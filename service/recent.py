"""Request latencies of the last minute per model, for the web page's live panel: a page cannot run PromQL, and
Prometheus keeps the full histograms for everything else. Appended to from the event loop only. Per process: with
several uvicorn workers each answers `/stats` for its own share of the requests."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

WINDOW_S = 60.0
CAP = 20_000  # latencies kept per model: the newest requests of a busy minute are enough for percentiles


class RecentLatencies:
    def __init__(self, window: float = WINDOW_S, cap: int = CAP):
        self.window, self.cap = window, cap
        self._seen: dict[str, deque[tuple[float, float]]] = {}
        self._arrivals: dict[str, deque[list]] = {}  # [second, count] buckets: the rate is not capped by CAP

    def observe(self, model: str, seconds: float, now: float | None = None) -> None:
        now = now or time.monotonic()
        self._seen.setdefault(model, deque(maxlen=self.cap)).append((now, seconds))
        buckets = self._arrivals.setdefault(model, deque())
        if buckets and buckets[-1][0] == int(now):
            buckets[-1][1] += 1
        else:
            buckets.append([int(now), 1])

    def summary(self, now: float | None = None) -> dict:
        """Per model: requests per second over the window, and p50/p95 latency in ms (None when idle)."""
        now = now or time.monotonic()
        models = {}
        for model, seen in self._seen.items():
            while seen and seen[0][0] < now - self.window:
                seen.popleft()
            buckets = self._arrivals[model]
            while buckets and buckets[0][0] < now - self.window:
                buckets.popleft()
            latencies = np.array([s for _, s in seen]) * 1000
            models[model] = {
                "requests_per_s": sum(count for _, count in buckets) / self.window,
                "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
                "p95_ms": float(np.percentile(latencies, 95)) if len(latencies) else None,
                "requests": sum(count for _, count in buckets),
            }
        return {"window_s": self.window, "models": models}


RECENT = RecentLatencies()
