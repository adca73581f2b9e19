"""Load on a running service: the same images to each variant at several concurrencies, side by side.

Variants alternate at every concurrency, so both see the same machine state; each request carries one image.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def drive(base: str, model: str, images: list[bytes], concurrency: int, requests: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            start = time.perf_counter()
            try:
                response = await client.post(
                    f"{base}/classify", params={"model": model}, content=images[i % len(images)],
                    headers={"Content-Type": "image/png"},
                )  # fmt: skip
                code = str(response.status_code)
            except httpx.TransportError as exc:
                code = type(exc).__name__
            if code == "200":
                latencies.append(time.perf_counter() - start)
            else:
                errors[code] = errors.get(code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = [1000 * x for x in latencies] or [float("nan")]
    return {
        "model": model, "concurrency": concurrency, "requests": requests, "ok": len(latencies),
        "errors": errors, "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms), "throughput_rps": len(latencies) / elapsed,
    }  # fmt: skip


def bench_http(base: str, images: list[Path], concurrencies: list[int], requests: int, models: list[str]) -> list[dict]:
    payloads = [path.read_bytes() for path in images]
    rows = []
    for c in concurrencies:
        order = models if c % 2 else list(reversed(models))
        asyncio.run(drive(base, order[0], payloads, c, min(requests, 2 * c)))  # warm connections, untimed
        for model in order:
            rows.append(asyncio.run(drive(base, model, payloads, c, requests)))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | concurrency | requests | ok | errors | p50 ms | p95 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {errors} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_rps']:.1f} |"
        )
    return "\n".join(lines) + "\n"
