"""onnxruntime speed of exported bundles, side by side: median ms per image per bundle, batch size and
graph-optimisation level, with the runs interleaved so that machine drift hits every bundle alike."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from export.bundle import read_manifest
from fpet.sessions import create_session

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")


def session(bundle: Path, level: str, threads: int):
    return create_session(bundle / read_manifest(bundle)["files"]["onnx"], threads=threads, optimization=level)


def bench_bundles(
    bundles: list[Path],
    batch_sizes: list[int],
    levels: tuple[str, ...] = LEVELS,
    repeats: int = 5,
    min_seconds: float = 0.5,
    threads: int = 2,
) -> list[dict]:
    manifests = [read_manifest(b) for b in bundles]
    sessions = {(i, level): session(b, level, threads) for i, b in enumerate(bundles) for level in levels}
    samples: dict[tuple, list[float]] = {}
    for batch in batch_sizes:
        inputs = [np.random.default_rng(0).random((batch, 3, m["img_size"], m["img_size"]), dtype=np.float32)
                  for m in manifests]  # fmt: skip
        for key, sess in sessions.items():  # warm-up: first runs allocate and pick kernels
            sess.run(None, {sess.get_inputs()[0].name: inputs[key[0]]})
        for _ in range(repeats):
            for (i, level), sess in sessions.items():
                feed = {sess.get_inputs()[0].name: inputs[i]}
                runs, start = 0, time.perf_counter()
                while True:
                    sess.run(None, feed)
                    runs += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_seconds:
                        break
                samples.setdefault((i, level, batch), []).append(1000 * elapsed / (runs * batch))
    rows = []
    for (i, level, batch), ms in samples.items():
        rows.append({
            "bundle": str(bundles[i]), "variant": manifests[i]["variant"], "schedule": manifests[i]["schedule"],
            "gmacs": manifests[i]["gmacs"], "optimization": level, "batch_size": batch,
            "ms_per_image": statistics.median(ms), "ms_range": [min(ms), max(ms)],
            "images_per_s": 1000 / statistics.median(ms),
        })  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["bundle"] == str(bundles[0]) and r["optimization"] == row["optimization"]
                    and r["batch_size"] == row["batch_size"])  # fmt: skip
        row["speedup_vs_first"] = base["ms_per_image"] / row["ms_per_image"]
        row["ideal_speedup_vs_first"] = base["gmacs"] / row["gmacs"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | schedule | GMACs | ORT optimisation | batch | ms/image (median) | range | speedup | ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["optimization"], r["batch_size"], r["bundle"])):
        lo, hi = r["ms_range"]
        lines.append(
            f"| {r['variant']} | `{r['schedule']}` | {r['gmacs']:.3f} | {r['optimization']} | {r['batch_size']} | "
            f"{r['ms_per_image']:.2f} | {lo:.2f}-{hi:.2f} | {r['speedup_vs_first']:.2f}x | "
            f"{r['ideal_speedup_vs_first']:.2f}x |"
        )
    return "\n".join(lines) + "\n"
