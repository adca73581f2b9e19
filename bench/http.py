"""Load on a running service: the same images to each variant at several concurrencies, side by side.

Variants and routes alternate at every concurrency, so all see the same machine state; each request carries one
image. Routes: `classify` (an encoded PNG to /classify), `oip-image` (the same PNG as an Open Inference Protocol
BYTES input) and `oip-pixels` (the image preprocessed by the client, as FP32 `pixel_values`), both through Triton's
binary extension as `tritonclient` sends them. Request bodies are built before the clock starts.
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from pathlib import Path

import httpx
from PIL import Image

from fpet.errors import FpetError
from fpet.imaging import normalize, resize_rgb
from service.oip import serialize_bytes

ROUTES = ("classify", "oip-image", "oip-pixels")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def oip_body(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({
        "inputs": [{"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + raw, headers


def requests_for(base: str, route: str, model: str, images: list[bytes]) -> list[tuple[str, bytes, dict]]:
    """(url, body, headers) per image for one route and model."""
    if route == "classify":
        return [(f"{base}/classify?model={model}", image, {"Content-Type": "image/png"}) for image in images]
    url = f"{base}/v2/models/{model}/infer"
    if route == "oip-image":
        return [(url, *oip_body("image", "BYTES", [1], serialize_bytes([image]))) for image in images]
    pre = httpx.get(f"{base}/v2/models/{model}", timeout=30).json()["preprocessing"]
    out = []
    for image in images:
        pixels = normalize(resize_rgb(Image.open(io.BytesIO(image)), pre["img_size"])[None], pre["mean"], pre["std"])
        out.append((url, *oip_body("pixel_values", "FP32", list(pixels.shape), pixels.astype("<f4").tobytes())))
    return out


async def drive(requests: list[tuple[str, bytes, dict]], concurrency: int, count: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            url, body, headers = requests[i % len(requests)]
            start = time.perf_counter()
            try:
                code = str((await client.post(url, content=body, headers=headers)).status_code)
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
        "concurrency": concurrency, "requests": count, "ok": len(latencies), "errors": errors,
        "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms), "throughput_rps": len(latencies) / elapsed,
    }  # fmt: skip


def bench_http(
    base: str,
    images: list[Path],
    concurrencies: list[int],
    requests: int,
    models: list[str],
    routes: tuple[str, ...] = ("classify",),
) -> list[dict]:
    unknown = set(routes) - set(ROUTES)
    if unknown:
        raise FpetError(f"unknown routes {sorted(unknown)}; choose from {', '.join(ROUTES)}")
    payloads = [path.read_bytes() for path in images]
    prepared = {(r, m): requests_for(base, r, m, payloads) for r in routes for m in models}
    cases = list(prepared)
    rows = []
    for c in concurrencies:
        order = cases if c % 2 else list(reversed(cases))
        asyncio.run(drive(prepared[order[0]], c, min(requests, 2 * c)))  # warm connections, untimed
        for route, model in order:
            rows.append({"route": route, "model": model, **asyncio.run(drive(prepared[route, model], c, requests))})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| route | model | concurrency | requests | ok | errors | p50 ms | p95 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            f"| {r['route']} | {r['model']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {errors} | "
            f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_rps']:.1f} |"
        )
    return "\n".join(lines) + "\n"
