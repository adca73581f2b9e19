"""Which runtime and compute precision run a bundle on this machine, and OpenVINO sessions with onnxruntime's
`run(outputs, feeds)`. No torch: the service, the benchmarks and export's checks share it.

onnxruntime runs a graph in the precision it was exported in (its CPU provider has no bf16 matrix kernels), on CPUs
and (onnxruntime-gpu) NVIDIA GPUs. OpenVINO compiles the same ONNX file for x86 CPUs and lowers it to bf16 on
their matrix engines (AMX, AVX512-BF16) itself, keeping the graph's tail (fpet's matching) in fp32. `auto` takes
OpenVINO bf16 where the CPU has such an engine and OpenVINO is installed, onnxruntime everywhere else.
"""

from __future__ import annotations

import functools
import importlib.util
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpet.errors import FpetError

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16")
CPUINFO = Path("/proc/cpuinfo")
# The flags that decide (and explain) what a CPU runs fast: matrix engines first.
FEATURES = ("amx_bf16", "amx_int8", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f", "avx2")
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


@functools.cache
def cpu_features(cpuinfo: Path = CPUINFO) -> tuple[str, ...]:
    """The FEATURES this CPU has, read from the kernel's flags (none where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return tuple(f for f in FEATURES if f in flags)


def supports(precision: str, features: tuple[str, ...]) -> bool:
    """Whether the CPU computes `precision` in hardware; OpenVINO would otherwise emulate it, slower than fp32."""
    if precision == "bf16":
        return "amx_bf16" in features or "avx512_bf16" in features
    if precision == "fp16":
        return "amx_fp16" in features or "avx512_fp16" in features
    if precision == "int8":
        return "amx_int8" in features or "avx512_vnni" in features
    return True


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def require_openvino(installed: bool) -> None:
    if not installed:
        raise FpetError("the openvino runtime is not installed: pip install openvino (or choose onnxruntime)")


def require_hardware(precision: str, features: tuple[str, ...]) -> None:
    if not supports(precision, features):
        engine = "AMX-BF16 or AVX512-BF16" if precision == "bf16" else "AMX-FP16 or AVX512-FP16"
        raise FpetError(
            f"{precision} needs a CPU with {engine}; this one has {', '.join(features) or 'neither'}: choose fp32"
        )


@dataclass(frozen=True)
class Choice:
    """A runtime and the precision it computes in, and why they were chosen."""

    runtime: str
    precision: str
    reason: str


def choose(
    runtime: str = "auto",
    precision: str = "auto",
    *,
    bundle_precision: str = "fp32",
    quantization: str | None = None,
    lowers_safely: bool = True,
    gpu: bool = False,
    features: tuple[str, ...] | None = None,
    openvino: bool | None = None,
) -> Choice:
    """Resolve `auto` and refuse what cannot run here, with a message that says what would.

    `gpu`: onnxruntime has CUDA and the caller may use it; a GPU keeps onnxruntime (onnxruntime-gpu's CUDA and
    TensorRT providers run the bundle's own precision, fp16 bundles for fp16). `quantization`: an int8 bundle's
    mode (export.quantize): static bundles go to OpenVINO on CPUs with int8 matrix instructions, dynamic ones to
    onnxruntime, each the runtime its form is made for. `lowers_safely`: the graph keeps its matching in fp32 when a
    runtime lowers the rest (export.bundle.runtime_facts); `auto` lowers no other graph."""
    features = cpu_features() if features is None else features
    openvino = openvino_installed() if openvino is None else openvino
    if runtime not in ("auto", *RUNTIMES):
        raise FpetError(f"unknown runtime {runtime!r}; choose auto or one of: {', '.join(RUNTIMES)}")
    if precision not in ("auto", *PRECISIONS):
        raise FpetError(f"unknown precision {precision!r}; choose auto or one of: {', '.join(PRECISIONS)}")
    reason = "asked for"
    if runtime == "auto":
        runtime, reason = auto_runtime(
            precision, bundle_precision, quantization, lowers_safely, gpu, features, openvino
        )
    if runtime == "openvino":
        require_openvino(openvino)
        if bundle_precision == "fp16":
            raise FpetError(
                "fp16 bundles are for GPUs (onnxruntime-gpu); to compute in fp16 on a CPU, export the "
                "bundle in fp32 and choose precision fp16"
            )
        if bundle_precision == "int8":
            if precision != "auto":
                raise FpetError(
                    "an int8 bundle runs in its own precision (its other layers in OpenVINO's default): "
                    "leave precision at auto"
                )
            return Choice("openvino", "int8", reason)
        if precision == "auto":
            precision = "bf16" if supports("bf16", features) else "fp32"
        require_hardware(precision, features)
        why = "bf16 on this CPU's matrix engine" if precision == "bf16" else f"{precision} asked for"
        return Choice("openvino", precision, reason or why)
    if precision not in ("auto", bundle_precision):
        if bundle_precision != "fp32":
            raise FpetError(f"an {bundle_precision} bundle runs in its own precision: leave precision at auto")
        elsewhere = "the openvino runtime (CPUs)" if openvino else "the openvino runtime (pip install openvino)"
        raise FpetError(
            f"onnxruntime runs a bundle in the precision it was exported in ({bundle_precision}); for "
            f"{precision} choose {elsewhere}" + (" or export an fp16 bundle (GPUs)" if precision == "fp16" else "")
        )
    return Choice("onnxruntime", bundle_precision, reason)


def auto_runtime(
    precision: str,
    bundle_precision: str,
    quantization: str | None,
    lowers_safely: bool,
    gpu: bool,
    features: tuple[str, ...],
    openvino: bool,
) -> tuple[str, str]:
    """`auto`: OpenVINO for low precision on a CPU that computes it, onnxruntime otherwise; and why."""
    if gpu:
        return "onnxruntime", "a GPU (onnxruntime's CUDA provider)"
    if bundle_precision == "int8" and quantization == "static" and openvino and supports("int8", features):
        return "openvino", "a static int8 bundle on this CPU's int8 matrix engine"
    if bundle_precision != "fp32":
        return "onnxruntime", f"an {bundle_precision} bundle" + (f" ({quantization})" if quantization else "")
    if precision == "fp32":
        return "onnxruntime", "fp32 asked for: onnxruntime, the project's fp32 path (--runtime openvino for OpenVINO's)"
    if not openvino:
        return "onnxruntime", "OpenVINO is not installed"
    if precision == "auto" and not supports("bf16", features):
        return "onnxruntime", "no bf16 matrix engine on this CPU (AMX-BF16 or AVX512-BF16)"
    if precision == "auto" and not lowers_safely:
        return "onnxruntime", "an older bundle, whose matching a runtime's bf16 would lower: re-export it for bf16"
    return "openvino", ""


class OpenVinoSession:
    """An OpenVINO model compiled for the CPU, with onnxruntime's `run(outputs, feeds)`.

    Every output stays in the compiled model, the merge maps included: they hold fpet's matching in the graph's
    fp32 tail (fpet.merge). Calls may come from several threads at once: each takes an infer request of its own from
    a pool. `streams` is how many run at once (the service's instances), `threads` all of them together."""

    def __init__(self, path: str | Path, precision: str = "bf16", threads: int = 0, streams: int = 1):
        import openvino as ov

        config = {"NUM_STREAMS": streams}
        if precision in OPENVINO_HINTS:  # int8: the quantized layers in int8, the rest in OpenVINO's default
            config["INFERENCE_PRECISION_HINT"] = OPENVINO_HINTS[precision]
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            results = request.infer(feeds)
            # copies: the request's output buffers are reused by its next call
            return [np.array(results[name]) for name in (outputs or self.output_names)]
        finally:
            self._idle.put(request)


def check_available(runtime: str, precision: str, features: tuple[str, ...] | None = None) -> None:
    """What can be refused before any bundle is read: a runtime that is not installed, or a precision no runtime
    here computes. The rest depends on each bundle (`choose`)."""
    features = cpu_features() if features is None else features
    if runtime == "openvino":
        require_openvino(openvino_installed())
    if precision == "bf16" and runtime == "onnxruntime":
        raise FpetError("onnxruntime has no bf16 kernels: choose the openvino runtime for bf16")
    if precision == "bf16" or (precision == "fp16" and runtime == "openvino"):  # fp16 on auto: maybe a GPU's
        require_hardware(precision, features)
