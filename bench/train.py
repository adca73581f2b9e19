"""Training throughput and peak memory per method and schedule, measured side by side.

Each measurement runs in a fresh process, so its peak RSS belongs to that configuration alone; configurations are
interleaved across repeats, so machine drift hits all alike. Random weights: speed and memory do not depend on them.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_once(spec: dict) -> dict:
    """Time `steps` training steps after `warmup`, in this process."""
    from fpet.vit import create_model

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = create_model(
        spec["backbone"],
        num_classes=10,
        img_size=spec["img_size"],
        method=spec["method"],
        schedule=spec["schedule"],
        drop_path_rate=0.1,
    ).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(spec["batch_size"], 3, spec["img_size"], spec["img_size"])
    y = torch.randint(0, 10, (spec["batch_size"],))
    before = rss_mb()
    times = []
    for step in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": spec["batch_size"] / statistics.median(times), "peak_rss_mb": peak, "rss_before_mb": before}


def bench_train(
    backbone: str,
    img_size: int,
    methods: list[str],
    schedules: list[str],
    batch_size: int = 64,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 3,
    threads: int = 2,
    log=print,
) -> list[dict]:
    specs = [
        {
            "backbone": backbone,
            "img_size": img_size,
            "method": m,
            "schedule": s,
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "threads": threads,
        }
        for m in methods
        for s in schedules
    ]
    samples: list[list[dict]] = [[] for _ in specs]
    for r in range(repeats):
        for i, spec in enumerate(specs):
            done = subprocess.run(
                [sys.executable, "-m", "bench.train", json.dumps(spec)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"measuring {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
            samples[i].append(json.loads(done.stdout))
            log(f"repeat {r + 1}/{repeats}: {spec['method']} {spec['schedule']}: {samples[i][-1]}")
    rows = []
    for spec, runs in zip(specs, samples, strict=True):
        ips = [s["images_per_s"] for s in runs]
        rows.append(
            {
                **{k: spec[k] for k in ("backbone", "img_size", "method", "schedule", "batch_size", "threads")},
                "images_per_s": statistics.median(ips),
                "images_per_s_range": [min(ips), max(ips)],
                "peak_rss_mb": statistics.median(s["peak_rss_mb"] for s in runs),
                "training_rss_mb": statistics.median(s["peak_rss_mb"] - s["rss_before_mb"] for s in runs),
            }
        )
    for method in methods:
        base = next(r for r in rows if r["method"] == method and r["schedule"] == schedules[0])
        for row in rows:
            if row["method"] == method:
                row["speedup"] = row["images_per_s"] / base["images_per_s"]
                row["memory_ratio"] = row["training_rss_mb"] / base["training_rss_mb"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | schedule | img/s (median) | range | speedup | peak RSS MB | training RSS MB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["images_per_s_range"]
        lines.append(
            f"| {r['method']} | `{r['schedule']}` | {r['images_per_s']:.1f} | {lo:.1f}-{hi:.1f} | "
            f"{r['speedup']:.2f}x | {r['peak_rss_mb']:.0f} | {r['training_rss_mb']:.0f} | {r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(measure_once(json.loads(sys.argv[1]))))
