"""Model speed per merge schedule, runtime, precision and batch size, measured side by side, with analytic ideals.

For each batch size the variants (schedule x runtime x precision) are interleaved across repeats, so machine drift
hits all alike; each sample runs for at least `min_seconds`. Speedups are against `none` with the same runtime,
precision and batch, in the same run (and against onnxruntime's fp32 `none`, the project's baseline, where it ran).
Random weights: speed does not depend on them. The FPET matching (key refinement, scores, argmax, merge) is timed
inside the torch runs to report its share of the model's time.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from fpet.config import get_config, grid_size
from fpet.cost import model_macs
from fpet.errors import FpetError
from fpet.pet import PetConfig
from fpet.runtimes import OpenVinoSession, cpu_features, supports
from fpet.schedule import parse_schedule, plan
from fpet.sessions import create_session
from fpet.vit import create_model

# also "onnxruntime-tensorrt" where onnxruntime has TensorRT
RUNTIMES = ("torch", "onnxruntime", "torchscript", "openvino")
ALIASES = {"onnx": "onnxruntime", "onnx-tensorrt": "onnxruntime-tensorrt"}
# int8 models are fp32 graphs quantized by onnxruntime (export.quantize): onnxruntime only
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def ort_providers(runtime: str, device: torch.device) -> list[str]:
    """What to ask onnxruntime for; an error where it cannot give it, so results are never mislabelled."""
    import onnxruntime as ort

    if runtime == "onnxruntime":
        return [CUDA, CPU] if device.type == "cuda" else [CPU]
    if device.type != "cuda":
        raise FpetError("onnxruntime-tensorrt runs on a GPU: add --device cuda")
    if TENSORRT not in ort.get_available_providers():
        raise FpetError(
            f"onnxruntime-tensorrt needs onnxruntime-gpu with TensorRT ({TENSORRT}); this onnxruntime has "
            f"{', '.join(ort.get_available_providers())}"
        )
    return [TENSORRT, CUDA, CPU]


def runs_in(runtime: str, precision: str, device: torch.device) -> bool:
    if runtime == "openvino":  # CPUs only; it lowers an fp32 graph to what this CPU computes in hardware
        return device.type == "cpu" and precision != "int8" and supports(precision, cpu_features())
    if precision == "int8":
        return runtime.startswith("onnxruntime")
    return not (runtime.startswith("onnxruntime") and precision == "bf16")  # onnxruntime has no bf16 kernels for these


class MergeTimer:
    """Accumulates the wall time spent in merge modules (synchronising on CUDA), via forward hooks."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.seconds, self.device, self._start = 0.0, device, 0.0
        for block in model.blocks:
            if block.merger is not None:
                block.merger.register_forward_pre_hook(self._before)
                block.merger.register_forward_hook(self._after)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, *_args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _after(self, *_args) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start


def make_runner(
    model, runtime: str, example: torch.Tensor, folder: Path, device: torch.device, precision: str = "fp32"
):
    """A callable running one batch to completion in the given runtime."""
    runtime = ALIASES.get(runtime, runtime)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if runtime == "torch":

        def run_torch(x: torch.Tensor) -> None:
            with torch.no_grad():
                model(x)
            sync()

        return run_torch
    if runtime == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)

        def run_ts(x: torch.Tensor) -> None:
            with torch.no_grad():
                traced(x)
            sync()

        return run_ts
    if runtime == "openvino":
        from export.exporter import INPUT_NAME, export_onnx

        path = folder / f"{id(model)}-{runtime}-{precision}.onnx"
        export_onnx(model.set_fused_attention(False), path, example, 17, maps=model.merges)
        session = OpenVinoSession(path, precision, torch.get_num_threads())
        return lambda x: session.run(None, {INPUT_NAME: x.cpu().numpy()})
    if runtime in ("onnxruntime", "onnxruntime-tensorrt"):
        from export.exporter import export_onnx

        providers = ort_providers(runtime, device)
        path = folder / f"{id(model)}-{runtime}.onnx"
        export_onnx(model.set_fused_attention(False), path, example, 17, maps=model.merges)  # as bundles are
        if precision == "int8":
            from export.quantize import quantize_int8

            quantized = path.with_suffix(".int8.onnx")
            if runtime == "onnxruntime-tensorrt":  # TensorRT takes int8 as QDQ with calibrated ranges
                calibration = torch.rand(16, *example.shape[1:]).numpy()
                quantize_int8(path, quantized, "static", calibration)
            else:
                quantize_int8(path, quantized, "dynamic")
            path = quantized
        session = create_session(path, providers)
        if session.get_providers()[0] != providers[0]:
            raise FpetError(f"{runtime}: onnxruntime fell back to {session.get_providers()[0]} from {providers[0]}")
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.cpu().numpy()})
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def sample(run: Callable, x: torch.Tensor, min_seconds: float) -> tuple[float, int]:
    """Total seconds and number of runs, running for at least `min_seconds`."""
    runs, start = 0, time.perf_counter()
    while True:
        run(x)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed, runs


def bench_model(
    backbone: str = "vit_small_patch16_224",
    img_size: int | None = None,
    schedules: list[str] = ("none", "6:0.5", "tome:13", "3:0.5+6:0.5+9:0.5"),
    runtimes: list[str] = RUNTIMES,
    batch_sizes: list[int] = (1, 8),
    threads: int = 2,
    device: str = "cpu",
    precisions: list[str] = ("fp32",),
    repeats: int = 3,
    min_seconds: float = 0.5,
    log: Callable[[str], None] = print,
) -> list[dict]:
    if device == "cuda" and not torch.cuda.is_available():
        raise FpetError("--device cuda: this torch has no CUDA (install a CUDA build of torch on a GPU machine)")
    runtimes = [ALIASES.get(r, r) for r in runtimes]
    unknown = [r for r in runtimes if r not in (*RUNTIMES, "onnxruntime-tensorrt")]
    if unknown or any(p not in DTYPES for p in precisions):
        raise FpetError(f"runtimes are {', '.join(RUNTIMES)}, onnxruntime-tensorrt; precisions {', '.join(DTYPES)}")
    torch.set_num_threads(threads)
    target = torch.device(device)
    cfg = get_config(backbone)
    size = img_size or cfg.img_size
    grid = grid_size(size, cfg.patch_size)
    schedules = list(dict.fromkeys(["none", *schedules]))
    models = {}
    for spec in schedules:
        torch.manual_seed(0)
        model = create_model(cfg, num_classes=1000, img_size=size, method="full", schedule=spec)
        models[spec] = model.freeze_for_deployment().to(target)
    setups = [(r, p) for p in precisions for r in runtimes if runs_in(r, p, target)]
    if not setups:
        raise FpetError(f"none of {', '.join(runtimes)} runs {', '.join(precisions)} on this {device}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fpet-bench-") as tmp:
        for batch in batch_sizes:
            runners, timers, inputs = {}, {}, {}
            for spec, model in models.items():
                for runtime, precision in setups:
                    # OpenVINO compiles the fp32 graph for the precision asked; the others run a graph in it
                    dtype = torch.float32 if runtime == "openvino" else DTYPES[precision]
                    x = inputs.setdefault(dtype, torch.rand(batch, 3, size, size, device=target).to(dtype))
                    instance = copy.deepcopy(model).to(dtype)
                    key = (spec, runtime, precision)
                    if runtime == "torch":
                        timers[key] = MergeTimer(instance, target)
                    runners[key] = (make_runner(instance, runtime, x, Path(tmp), target, precision), x)
                    runners[key][0](x)  # warm-up
            samples: dict[tuple, list[float]] = {key: [] for key in runners}
            merge_share: dict[tuple, list[float]] = {key: [] for key in timers}
            for r in range(repeats):
                for key, (run, x) in runners.items():
                    timer = timers.get(key)
                    before = timer.seconds if timer else 0.0
                    elapsed, runs = sample(run, x, min_seconds)
                    samples[key].append(elapsed / runs)
                    if timer:
                        merge_share[key].append((timer.seconds - before) / elapsed)
                log(f"batch {batch}: repeat {r + 1}/{repeats} done")
            for (spec, runtime, precision), values in samples.items():
                steps = plan(parse_schedule(spec), cfg.depth, grid)
                macs = model_macs(cfg, grid, steps, PetConfig("full"), 1000)
                ms = statistics.median(values) * 1000 / batch
                row = {
                    "backbone": backbone,
                    "img_size": size,
                    "schedule": parse_schedule(spec).spec,
                    "runtime": runtime,
                    "batch_size": batch,
                    "precision": precision,
                    "device": device,
                    "threads": threads,
                    "ms_per_image": ms,
                    "ms_per_image_range": [min(values) * 1000 / batch, max(values) * 1000 / batch],
                    "images_per_s": 1000 / ms,
                    "gmacs": macs / 1e9,
                }
                share = merge_share.get((spec, runtime, precision))
                if share and spec != "none":
                    row["merge_share_of_time"] = statistics.median(share)
                rows.append(row)
    for row in rows:
        same_batch = [r for r in rows if r["schedule"] == "none" and r["batch_size"] == row["batch_size"]]
        base = next(r for r in same_batch if (r["runtime"], r["precision"]) == (row["runtime"], row["precision"]))
        reference = next((r for r in same_batch if (r["runtime"], r["precision"]) == ("onnxruntime", "fp32")), None)
        row["speedup"] = base["ms_per_image"] / row["ms_per_image"]
        row["speedup_vs_onnxruntime_fp32"] = reference["ms_per_image"] / row["ms_per_image"] if reference else None
        row["ideal_speedup"] = base["gmacs"] / row["gmacs"]
        row["measured_over_ideal"] = row["speedup"] / row["ideal_speedup"]
    return rows


def markdown(rows: list[dict]) -> str:
    header = "| schedule | runtime | precision | batch | ms/image (median) | range | img/s | speedup |"
    lines = [header + " vs ORT fp32 none | GMACs | ideal | measured/ideal | merge share |", "|---" * 13 + "|"]
    for r in sorted(rows, key=lambda r: (r["runtime"], r["precision"], r["batch_size"], -r["gmacs"])):
        lo, hi = r["ms_per_image_range"]
        share = f"{100 * r['merge_share_of_time']:.1f}%" if "merge_share_of_time" in r else "-"
        reference = r.get("speedup_vs_onnxruntime_fp32")
        lines.append(
            f"| `{r['schedule']}` | {r['runtime']} | {r['precision']} | {r['batch_size']} | {r['ms_per_image']:.2f} | "
            f"{lo:.2f}-{hi:.2f} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{'-' if reference is None else f'{reference:.2f}x'} | {r['gmacs']:.2f} | {r['ideal_speedup']:.2f}x | "
            f"{r['measured_over_ideal']:.2f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """speedup_by_batch.png (one panel per runtime and precision) and measured_vs_ideal.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def setup(row: dict) -> str:
        return f"{row['runtime']} {row['precision']}"

    runtimes = sorted({setup(r) for r in rows})
    fig, axes = plt.subplots(1, len(runtimes), figsize=(5 * len(runtimes), 4), squeeze=False)
    for ax, runtime in zip(axes[0], runtimes, strict=True):
        for spec in dict.fromkeys(r["schedule"] for r in rows):
            points = sorted(
                (r["batch_size"], r["speedup"]) for r in rows if setup(r) == runtime and r["schedule"] == spec
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=spec)
        ax.set_xscale("log", base=2)
        ax.set_title(runtime)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over none")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['backbone']} at {rows[0]['img_size']} px, {rows[0]['device']}")
    fig.tight_layout()
    paths = [folder / "speedup_by_batch.png", folder / "measured_vs_ideal.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    for runtime in runtimes:
        sub = [r for r in rows if setup(r) == runtime and r["schedule"] != "none"]
        ax.scatter([r["ideal_speedup"] for r in sub], [r["speedup"] for r in sub], label=runtime)
    top = max(max(r["ideal_speedup"], r["speedup"]) for r in rows) * 1.05
    ax.plot([1, top], [1, top], color="grey", linestyle="--", label="ideal (GMACs)")
    ax.set_xlabel("ideal speedup (GMACs)")
    ax.set_ylabel("measured speedup")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
