"""Speed of exported bundles side by side, per runtime and compute precision: median ms per image per bundle, runtime
(onnxruntime, OpenVINO), precision and batch size, with the runs interleaved so that machine drift hits every setup
alike; optionally each setup's accuracy on a labelled split and its top-1 agreement with the same bundle run by
onnxruntime in the precision it was exported in, so that a faster precision shows what it costs."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.bundle import read_manifest, runtime_facts
from fpet import selfcheck
from fpet.errors import FpetError
from fpet.runtimes import PRECISIONS as COMPUTED
from fpet.runtimes import RUNTIMES, OpenVinoSession, choose, cpu_features
from fpet.sessions import OPTIMIZATION, create_session

LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")
PRECISIONS = (*COMPUTED, "int8")  # int8: an int8 bundle's own


@dataclass(frozen=True)
class Setup:
    """One way of running one bundle: `level` is onnxruntime's graph optimisation (None for OpenVINO)."""

    bundle: int
    runtime: str
    precision: str
    level: str | None


def bundle_precision(manifest: dict) -> str:
    quantization = manifest.get("quantization")
    return f"{manifest['precision']} {quantization['mode']}" if quantization else manifest["precision"]


def runs_here(manifest: dict, runtime: str, precision: str) -> bool:
    """Whether `runtime` computes this bundle in `precision` on this machine (fpet.runtimes decides, as the
    service's does); int8 is an int8 bundle's own precision."""
    own = manifest["precision"]
    if (precision == "int8") != (own == "int8"):
        return False
    try:
        choice = choose(runtime, "auto" if precision == "int8" else precision, **runtime_facts(manifest))
    except FpetError:
        return False
    return choice.precision == precision


def setups(manifests: list[dict], runtimes: tuple[str, ...], precisions: tuple[str, ...], levels: tuple[str, ...]):
    found = []
    for i, manifest in enumerate(manifests):
        for runtime in runtimes:
            for precision in precisions:
                if runs_here(manifest, runtime, precision):
                    found += (
                        [Setup(i, runtime, precision, level) for level in levels]
                        if runtime == "onnxruntime"
                        else [Setup(i, runtime, precision, None)]
                    )
    if not found:
        raise FpetError(
            f"none of runtimes {', '.join(runtimes)} computes these bundles in {', '.join(precisions)} "
            f"on this machine (CPU features: {', '.join(cpu_features()) or 'none found'})"
        )
    return found


def session(model: Path, setup: Setup, threads: int, callers: int = 1):
    """`model`: a bundle's ONNX file. onnxruntime: one session of `threads` intra-op threads that the callers share;
    OpenVINO: one stream per caller, `threads` each, as the service's instances are."""
    if setup.runtime == "openvino":
        return OpenVinoSession(model, setup.precision, threads * callers, callers)
    return create_session(model, threads=threads, optimization=setup.level or OPTIMIZATION)


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
    runtimes: tuple[str, ...] = ("onnxruntime",),
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8"),
) -> list[dict]:
    if callers < 1:
        raise FpetError(f"callers must be at least 1, not {callers}")
    unknown = [r for r in runtimes if r not in RUNTIMES] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise FpetError(
            f"unknown {', '.join(unknown)}: runtimes are {', '.join(RUNTIMES)}, precisions {', '.join(PRECISIONS)}"
        )
    manifests = [read_manifest(b) for b in bundles]
    models = [bundle / m["files"]["onnx"] for bundle, m in zip(bundles, manifests, strict=True)]
    sessions = {
        s: session(models[s.bundle], s, threads, callers) for s in setups(manifests, runtimes, precisions, levels)
    }
    for setup, sess in sessions.items():  # speed is only worth measuring for a graph that still computes the model
        check_bundle(sess, bundles[setup.bundle], manifests[setup.bundle], setup)
    samples: dict[tuple[Setup, int], list[float]] = {}
    for batch in batch_sizes:
        inputs = [
            np.random.default_rng(0)
            .random((batch, 3, m["img_size"], m["img_size"]), dtype=np.float32)
            .astype(np.float16 if m["precision"] == "fp16" else np.float32)
            for m in manifests
        ]
        feeds = [{m["input"]["name"]: x} for m, x in zip(manifests, inputs, strict=True)]
        outputs = [[m["output"]["name"]] for m in manifests]  # logits only, as the service asks
        for setup, sess in sessions.items():  # warm-up: first runs allocate and pick kernels
            sess.run(outputs[setup.bundle], feeds[setup.bundle])
        for _ in range(repeats):
            for setup, sess in sessions.items():
                runs, elapsed = timed_runs(sess, outputs[setup.bundle], feeds[setup.bundle], min_seconds, callers)
                samples.setdefault((setup, batch), []).append(1000 * elapsed / (runs * batch))
    rows = []
    for (setup, batch), ms in samples.items():
        m = manifests[setup.bundle]
        rows.append(
            {
                "bundle": str(bundles[setup.bundle]),
                "variant": m["variant"],
                "bundle_precision": bundle_precision(m),
                "runtime": setup.runtime,
                "precision": setup.precision,
                "schedule": m["schedule"],
                "threads": threads,
                "callers": callers,
                "gmacs": m["gmacs"],
                "optimization": setup.level or "-",
                "batch_size": batch,
                "ms_per_image": statistics.median(ms),
                "ms_range": [min(ms), max(ms)],
                "images_per_s": 1000 / statistics.median(ms),
            }
        )
    first = str(bundles[0])
    for row in rows:
        same = [r for r in rows if r["bundle"] == first and r["batch_size"] == row["batch_size"]]
        base = next(
            (
                r
                for r in same
                if (r["runtime"], r["precision"], r["optimization"])
                == (row["runtime"], row["precision"], row["optimization"])
            ),
            None,
        )
        reference = next(
            (
                r
                for r in same
                if r["runtime"] == "onnxruntime"
                and r["precision"] == "fp32"
                and r["optimization"] in ("ORT_ENABLE_ALL", "-")
            ),
            None,
        )
        row["speedup_vs_first"] = base["ms_per_image"] / row["ms_per_image"] if base else None
        row["speedup_vs_onnxruntime_fp32"] = reference["ms_per_image"] / row["ms_per_image"] if reference else None
        row["ideal_speedup_vs_first"] = manifests[0]["gmacs"] / row["gmacs"]
    return rows


def check_bundle(sess, bundle: Path, manifest: dict, setup: Setup) -> None:
    """The bundle's self-check on this runtime and precision (fpet.selfcheck); an error when it fails."""
    dtype = np.float16 if manifest["precision"] == "fp16" else np.float32

    def run(x: np.ndarray, tasks: np.ndarray | None) -> np.ndarray:
        feed = {manifest["input"]["name"]: x.astype(dtype)}
        if tasks is not None:
            feed[manifest["task_input"]["name"]] = tasks
        return sess.run([manifest["output"]["name"]], feed)[0]

    result = selfcheck.check(run, bundle, manifest, setup.precision, facts={"runtime": setup.runtime})
    if not result["passed"]:
        raise FpetError(f"{bundle}: {selfcheck.summary(result)}")


def bundle_predictions(
    bundle: Path,
    data: Path,
    split: str = "test",
    batch_size: int = 64,
    threads: int = 2,
    runtime: str = "onnxruntime",
    precision: str | None = None,
    optimization: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 predictions and labels of a bundle on every image of a split, through the bundle's own preprocessing.
    `optimization`: onnxruntime's graph optimisation level instead of the bundle's (ORT_DISABLE_ALL runs a QDQ graph
    as written: rounding, then fp32 products, whatever integer kernels the CPU has)."""
    from training.data import Preprocessing, open_split

    manifest = read_manifest(bundle)
    labels = json.loads((bundle / manifest["files"]["labels"]).read_text())
    source = open_split(data, split, classes=labels)
    if source is None:
        raise FpetError(f"{data} has no {split} split")
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    setup = Setup(
        0,
        runtime,
        precision or manifest["precision"],
        optimization or manifest.get("onnxruntime", {}).get("graph_optimization_level", LEVELS[-1]),
    )
    sess = session(bundle / manifest["files"]["onnx"], setup, threads)
    dtype = np.float16 if manifest["precision"] == "fp16" else np.float32
    predicted, truth = [], []
    for start in range(0, len(source), batch_size):
        decoded = source.decode(range(start, min(start + batch_size, len(source))), pre)
        x = pre.to_input(decoded.pixels).numpy().astype(dtype)
        logits = sess.run([manifest["output"]["name"]], {manifest["input"]["name"]: x})[0]
        predicted.append(logits.argmax(-1))
        truth.append(decoded.labels.numpy())
    return np.concatenate(predicted), np.concatenate(truth)


def add_accuracy(rows: list[dict], data: Path, threads: int, log: Callable[[str], None] = print) -> None:
    """Each bundle's accuracy per runtime and precision on every test image, and its top-1 agreement with the same
    bundle in onnxruntime at the precision it was exported in."""
    references: dict[str, tuple] = {}
    found: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        bundle, key = row["bundle"], (row["bundle"], row["runtime"], row["precision"])
        if bundle not in references:
            log(f"predictions of {bundle} (onnxruntime, its own precision) on {data} ...")
            references[bundle] = bundle_predictions(Path(bundle), data, threads=threads)
        if key not in found:
            reference, truth = references[bundle]
            predicted = reference
            if row["runtime"] != "onnxruntime":
                log(f"predictions of {bundle} ({row['runtime']} {row['precision']}) ...")
                predicted, _ = bundle_predictions(
                    Path(bundle), data, threads=threads, runtime=row["runtime"], precision=row["precision"]
                )
            found[key] = {
                "split": "test",
                "images": len(truth),
                "accuracy": 100 * int((predicted == truth).sum()) / len(truth),
                "top1_agreement": 100 * int((predicted == reference).sum()) / len(truth),
            }
        row["accuracy"] = found[key]


def markdown(rows: list[dict]) -> str:
    setups = sorted({(r["threads"], r["callers"]) for r in rows})
    lines = [
        "; ".join(f"threads per caller: {t or 'the runtime default'}, callers per session: {c}" for t, c in setups),
        "",
        "| bundle | variant | runtime | precision | schedule | GMACs | ORT optimisation | batch | ms/image (median) | "
        "range | speedup | vs ORT fp32 | ideal | accuracy | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for r in sorted(
        rows, key=lambda r: (r["batch_size"], r["runtime"], r["precision"], r["optimization"], r["bundle"])
    ):
        lo, hi = r["ms_range"]
        accuracy = f"{r['accuracy']['accuracy']:.2f}%" if r.get("accuracy") else "-"
        agreement = (r.get("accuracy") or {}).get("top1_agreement")
        agreement = "-" if agreement is None else f"{agreement:.2f}%"
        name = "/".join(Path(r["bundle"]).parts[-2:])
        lines.append(
            f"| {name} | {r['variant']} | {r['runtime']} | {r['precision']} | `{r['schedule']}` | "
            f"{r['gmacs']:.3f} | {r['optimization']} | {r['batch_size']} | {r['ms_per_image']:.2f} | "
            f"{lo:.2f}-{hi:.2f} | {ratio(r['speedup_vs_first'])} | {ratio(r['speedup_vs_onnxruntime_fp32'])} | "
            f"{r['ideal_speedup_vs_first']:.2f}x | {accuracy} | {agreement} |"
        )
    return "\n".join(lines) + "\n"
