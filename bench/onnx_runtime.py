"""onnxruntime speed of exported bundles, side by side: median ms per image per bundle, batch size and
graph-optimisation level, with the runs interleaved so that machine drift hits every bundle alike; optionally each
bundle's accuracy on a labelled split, so that a faster precision shows what it costs."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from export.bundle import read_manifest
from fpet.errors import FpetError
from fpet.sessions import create_session

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")


def precision(manifest: dict) -> str:
    quantization = manifest.get("quantization")
    return f"{manifest['precision']} {quantization['mode']}" if quantization else manifest["precision"]


def session(bundle: Path, level: str, threads: int):
    return create_session(bundle / read_manifest(bundle)["files"]["onnx"], threads=threads, optimization=level)


def timed_runs(sess, outputs: list[str], feed: dict, min_seconds: float, callers: int = 1) -> tuple[int, float]:
    """Runs completed and seconds taken, with `callers` threads calling the one session at once, as the service's
    instances do (`fpet serve --instances N`); each caller finishes the run it started when time is up."""
    counts, stop = [0] * callers, time.perf_counter() + min_seconds

    def call(i: int) -> None:
        while True:
            sess.run(outputs, feed)
            counts[i] += 1
            if time.perf_counter() >= stop:
                return

    start = time.perf_counter()
    if callers == 1:
        call(0)
    else:
        workers = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    return sum(counts), time.perf_counter() - start


def bench_bundles(
    bundles: list[Path],
    batch_sizes: list[int],
    levels: tuple[str, ...] = LEVELS,
    repeats: int = 5,
    min_seconds: float = 0.5,
    threads: int = 2,
    callers: int = 1,
) -> list[dict]:
    if callers < 1:
        raise FpetError(f"callers must be at least 1, not {callers}")
    manifests = [read_manifest(b) for b in bundles]
    sessions = {(i, level): session(b, level, threads) for i, b in enumerate(bundles) for level in levels}
    samples: dict[tuple, list[float]] = {}
    outputs = [[m["output"]["name"]] for m in manifests]  # logits only, as the service asks
    for batch in batch_sizes:
        inputs = [np.random.default_rng(0).random((batch, 3, m["img_size"], m["img_size"]), dtype=np.float32)
                  for m in manifests]  # fmt: skip
        for key, sess in sessions.items():  # warm-up: first runs allocate and pick kernels
            sess.run(outputs[key[0]], {sess.get_inputs()[0].name: inputs[key[0]]})
        for _ in range(repeats):
            for (i, level), sess in sessions.items():
                feed = {sess.get_inputs()[0].name: inputs[i]}
                runs, elapsed = timed_runs(sess, outputs[i], feed, min_seconds, callers)
                samples.setdefault((i, level, batch), []).append(1000 * elapsed / (runs * batch))
    rows = []
    for (i, level, batch), ms in samples.items():
        rows.append({
            "bundle": str(bundles[i]), "variant": manifests[i]["variant"], "precision": precision(manifests[i]),
            "schedule": manifests[i]["schedule"], "threads": threads, "callers": callers,
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


def bundle_accuracy(bundle: Path, data: Path, split: str = "test", batch_size: int = 64, threads: int = 2) -> dict:
    """Top-1 accuracy of a bundle on every image of a split, through the bundle's own preprocessing."""
    from training.data import Preprocessing, open_split

    manifest = read_manifest(bundle)
    labels = json.loads((bundle / manifest["files"]["labels"]).read_text())
    source = open_split(data, split, classes=labels)
    if source is None:
        raise FpetError(f"{data} has no {split} split")
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    sess = session(bundle, manifest.get("onnxruntime", {}).get("graph_optimization_level", LEVELS[-1]), threads)
    dtype = np.float16 if manifest["precision"] == "fp16" else np.float32
    correct = total = 0
    for start in range(0, len(source), batch_size):
        decoded = source.decode(range(start, min(start + batch_size, len(source))), pre)
        x = pre.to_input(decoded.pixels).numpy().astype(dtype)
        logits = sess.run([manifest["output"]["name"]], {sess.get_inputs()[0].name: x})[0]
        correct += int((logits.argmax(-1) == decoded.labels.numpy()).sum())
        total += len(decoded)
    return {"split": split, "images": total, "accuracy": 100 * correct / total}


def markdown(rows: list[dict]) -> str:
    setups = sorted({(r["threads"], r["callers"]) for r in rows})
    lines = [
        "; ".join(f"{t or 'onnxruntime default'} intra-op threads, {c} caller(s) per session" for t, c in setups),
        "",
        "| bundle | variant | precision | schedule | GMACs | ORT optimisation | batch | ms/image (median) | range | "
        "speedup | ideal | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["optimization"], r["batch_size"], r["bundle"])):
        lo, hi = r["ms_range"]
        accuracy = f"{r['accuracy']['accuracy']:.2f}%" if r.get("accuracy") else "-"
        lines.append(
            f"| {Path(r['bundle']).name} | {r['variant']} | {r['precision']} | `{r['schedule']}` | {r['gmacs']:.3f} | "
            f"{r['optimization']} | "
            f"{r['batch_size']} | {r['ms_per_image']:.2f} | {lo:.2f}-{hi:.2f} | {r['speedup_vs_first']:.2f}x | "
            f"{r['ideal_speedup_vs_first']:.2f}x | {accuracy} |"
        )
    return "\n".join(lines) + "\n"
