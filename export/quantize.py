"""int8 bundles: onnxruntime quantization of the linear layers of an exported fp32 graph.

Only matrix products with a constant weight are quantized, and only those wide enough to pay for quantizing their
input: attention's products and the merge's product have no constant weight and stay fp32, and the layer that feeds
the matching its keys (`key_mean`) is left fp32 by name, so matching and merging run as in the fp32 graph; the
adapters' bottleneck layers (a few columns) stay fp32 because quantizing their input costs more than their product
(measured: 3% of the int8 model's time).

Two forms, for two kinds of runtime (docs/benchmarks.md, "int8 bundles"). Dynamic quantization (activations
quantized per call, uint8) is the default and what onnxruntime's CPU provider runs fastest. Static quantization is
QDQ calibrated on the run's training images, symmetric int8 on both sides (no zero points): the form OpenVINO turns
into int8 products on AMX-INT8 or VNNI (with uint8 zero points it left their conversions and subtractions as separate
layers, and ran slower than bf16) and the only one TensorRT takes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from fpet.errors import FpetError

MODES = ("dynamic", "static")
MIN_WIDTH = 64  # narrower weights stay fp32
METRIC_LAYER = "key_mean"  # fpet.vit.Attention.fold_key_mean: the merge metric, matched in fp32
CALIBRATION_BATCH = 8


def quantizable_matmuls(model) -> list[str]:
    """Names of the MatMul nodes whose weight is a constant at least MIN_WIDTH wide in both dimensions, but for the
    merge metric's."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and min(weights.get(node.input[1], [0])) >= MIN_WIDTH
        and METRIC_LAYER not in node.name
    ]


def unquantize_metric_input(path: Path) -> None:
    """QDQ quantizes a tensor once for all its readers: the LayerNorm output that feeds qkv also feeds the merge
    metric's layer, which would then read int8-rounded activations. Point it back at the float tensor."""
    model = onnx.load(str(path))
    rounded = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    quantized = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    for node in model.graph.node:
        if METRIC_LAYER in node.name:
            for i, name in enumerate(node.input):
                if name in rounded and rounded[name] in quantized:
                    node.input[i] = quantized[rounded[name]]
    onnx.save(model, str(path))


def quantize_int8(
    src: Path, dst: Path, mode: str = "dynamic", calibration: np.ndarray | None = None, tasks: np.ndarray | None = None
) -> dict:
    """Write the int8 form of `src` to `dst`; returns what the manifest records about it. `tasks`: a multi-task
    graph's task index for each calibration image."""
    if mode not in MODES:
        raise FpetError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "static" and (calibration is None or not len(calibration)):
        raise FpetError("static quantization needs calibration images: the run's training data is not on this machine")
    with tempfile.TemporaryDirectory(prefix="fpet-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        nodes = quantizable_matmuls(onnx.load(str(prepared)))
        common = dict(
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(dst), **common)
        else:
            names = [i.name for i in onnx.load(str(prepared)).graph.input]
            feeds = {names[0]: calibration} if tasks is None else {names[0]: calibration, names[1]: tasks}
            quantize_static(
                str(prepared),
                str(dst),
                CalibrationReader(feeds),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                **common,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
            unquantize_metric_input(dst)
    return {
        "mode": mode,
        "tool": "onnxruntime.quantization",
        "weights": "int8, per output channel",
        "activations": "uint8, range per call"
        if mode == "dynamic"
        else f"int8 symmetric, calibrated on {len(calibration)} images",
        "quantized_matmuls": len(nodes),
        "kept_fp32": "attention and merge products (no constant weight); the merge metric; weights narrower than "
        f"{MIN_WIDTH} (adapter bottlenecks); the patch embedding and the head",
    }


class CalibrationReader(CalibrationDataReader):
    """Preprocessed float images (and a multi-task graph's task indices) in batches, as onnxruntime's calibration
    asks for them."""

    def __init__(self, feeds: dict[str, np.ndarray]):
        self._batches = self._iterate(feeds)

    @staticmethod
    def _iterate(feeds: dict[str, np.ndarray]) -> Iterator[dict]:
        count = len(next(iter(feeds.values())))
        for start in range(0, count, CALIBRATION_BATCH):
            yield {name: array[start : start + CALIBRATION_BATCH] for name, array in feeds.items()}

    def get_next(self) -> dict | None:
        return next(self._batches, None)
