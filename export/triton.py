"""A Triton Inference Server model repository from a run: `<repo>/<variant>_<task>/{config.pbtxt, 1/model.onnx,
labels.txt}` for the fpet and backbone variants.

Each variant is exported and verified against PyTorch as a bundle first; its graph then gets the tensor names the
service speaks (input `pixel_values`, outputs `logits` and `probabilities`, a softmax appended), so one client works
against `fpet serve` and against Triton. Triton gets preprocessed pixels: the client resizes and normalises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.bundle import LABELS, MANIFEST, ONNX_FILE, VARIANTS
from export.exporter import INPUT_NAME, OUTPUT_NAME, ExportOptions, export_bundle, replace_dir
from fpet.atomic import current_umask, write_json_atomic
from fpet.errors import FpetError
from fpet.sessions import create_session

PIXELS, LOGITS, PROBABILITIES = "pixel_values", OUTPUT_NAME, "probabilities"
MARK = ".fpet-triton.json"  # marks a repository this wrote, so a later export may replace it
KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TritonOptions:
    task: str | None = None  # model names are <variant>_<task>; default: the run folder's name
    max_batch_size: int = 32
    queue_delay_us: int = 2000
    instance_kind: str = "auto"
    instances: int = 1
    tensorrt: bool = False
    precision: str = "fp32"
    opset: int = 17
    quantization: str = "dynamic"  # int8 only, as for a bundle (`fpet export --quantization`)

    def __post_init__(self) -> None:
        if self.task is not None and not NAME.match(self.task):
            raise FpetError(f"task name {self.task!r}: use letters, digits, '_', '.' and '-'")
        if self.max_batch_size < 1 or self.queue_delay_us < 0 or self.instances < 1:
            raise FpetError("max batch size and instances must be at least 1, the queue delay at least 0")
        if self.instance_kind not in KINDS:
            raise FpetError(f"instance kind {self.instance_kind!r}: choose one of {', '.join(KINDS)}")


def triton_graph(source: Path, target: Path) -> None:
    """The bundle's graph renamed for Triton's clients, with a softmax output beside the logits."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = model.graph
    for node in graph.node:
        node.input[:] = [PIXELS if name == INPUT_NAME else name for name in node.input]
    graph.input[0].name = PIXELS
    del graph.output[1:]  # the merge maps: Triton's clients get logits and probabilities
    needed, kept = {LOGITS}, []
    for node in reversed(graph.node):  # drop what only the merge maps used
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    logits = graph.output[0]
    graph.node.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1, name="probabilities"))
    dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES, logits.type.tensor_type.elem_type, dims))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))


def config_pbtxt(name: str, manifest: dict, data_type: str, options: TritonOptions) -> str:
    """Triton's model configuration (protobuf text format); the batch dimension is implicit (max_batch_size > 0)."""
    size, classes = manifest["img_size"], manifest["num_classes"]
    pre = manifest["preprocessing"]
    outputs = ",\n".join(
        f'  {{\n    name: "{out}"\n    data_type: {data_type}\n    dims: [ {classes} ]\n'
        f'    label_filename: "labels.txt"\n  }}'
        for out in (LOGITS, PROBABILITIES)
    )
    tensorrt = (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
        '        name: "tensorrt"\n        parameters { key: "precision_mode" value: "FP16" }\n'
        '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n      }\n    ]\n  }\n}\n'
        if options.tensorrt
        else ""
    )
    return (
        f"# {manifest['variant']} variant of the FPET run {manifest['name']} (version {manifest['version']}): "
        f"{manifest['method']}, schedule {manifest['schedule']}, {manifest['gmacs']:.3f} GMACs per image.\n"
        f"# Clients send preprocessed pixels: RGB, bicubic resize of the whole image to {size}x{size}, x/255, then "
        f"(x - {pre['mean']}) / {pre['std']} per channel, channels first.\n"
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {options.max_batch_size}\n'
        f'input [\n  {{\n    name: "{PIXELS}"\n    data_type: {data_type}\n    dims: [ 3, {size}, {size} ]\n  }}\n]\n'
        f"output [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {KINDS[options.instance_kind]}\n  }}\n]\n"
        f'model_warmup [\n  {{\n    name: "zeros"\n    batch_size: 1\n    inputs {{\n      key: "{PIXELS}"\n'
        f"      value {{\n        data_type: {data_type}\n        dims: [ 3, {size}, {size} ]\n"
        f"        zero_data: true\n      }}\n    }}\n  }}\n]\n"
        f"{tensorrt}"
    )


def check_against_bundle(model_onnx: Path, bundle_onnx: Path, size: int, dtype: np.dtype) -> None:
    """The renamed graph computes the bundle's logits and their softmax."""
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(dtype)
    ours, theirs = create_session(model_onnx), create_session(bundle_onnx)
    logits, probabilities = ours.run([LOGITS, PROBABILITIES], {PIXELS: x})
    (expected,) = theirs.run([OUTPUT_NAME], {INPUT_NAME: x})
    shifted = np.exp(expected.astype(np.float64) - expected.max(axis=1, keepdims=True))
    if not (
        np.array_equal(logits, expected)
        and np.allclose(probabilities, shifted / shifted.sum(1, keepdims=True), atol=1e-3)
    ):
        raise FpetError(f"{model_onnx} does not reproduce its bundle; the repository was not written")


def check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FpetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise FpetError(f"{out} exists, is not empty and is not a repository fpet wrote: refusing to replace it")


def export_triton_repository(
    run_dir: str | Path, out: str | Path, options: TritonOptions | None = None, log: Callable[[str], None] = print
) -> list[Path]:
    """Both variants, verified, written into a temporary folder and renamed into `out` only when all is done."""
    options = options or TritonOptions()
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FpetError(f"{run_dir} is not a run folder")
    check_destination(out)
    task = options.task or run_dir.resolve().name
    if not NAME.match(task):
        raise FpetError(f"the run folder's name {task!r} is not a valid model name: give --task")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        names = []
        for variant in VARIANTS:
            bundle = tmp / ".bundles" / variant
            export_options = ExportOptions(variant, ("onnx",), options.precision, options.opset, options.quantization)
            manifest = export_bundle(run_dir, bundle, export_options, log=log)
            labels = json.loads((bundle / LABELS).read_text())
            if any("\n" in label for label in labels):
                raise FpetError("a label contains a line break; Triton's label files hold one label per line")
            name = f"{variant}_{task}"
            model = tmp / name
            (model / "1").mkdir(parents=True)
            triton_graph(bundle / ONNX_FILE, model / "1" / ONNX_FILE)
            dtype = np.float16 if options.precision == "fp16" else np.float32
            check_against_bundle(model / "1" / ONNX_FILE, bundle / ONNX_FILE, manifest["img_size"], dtype)
            data_type = "TYPE_FP16" if options.precision == "fp16" else "TYPE_FP32"
            (model / "config.pbtxt").write_text(config_pbtxt(name, manifest, data_type, options))
            (model / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
            shutil.copy(bundle / MANIFEST, model / f"fpet_{MANIFEST}")
            names.append(name)
            log(f"{name}: {model.name}/config.pbtxt, 1/{ONNX_FILE}, labels.txt")
        shutil.rmtree(tmp / ".bundles")
        write_json_atomic(tmp / MARK, {"run": str(run_dir.resolve()), "task": task, "models": names})
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [out / name for name in names]
