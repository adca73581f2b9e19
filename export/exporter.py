"""Freezing a run into verified ONNX and TorchScript bundles.

The exported model is the deployment form: LoRA folded into qkv, 1-bit weights materialised, merges computing
only the hard assignment, so every shape is static and no scatter op is emitted. It is checked against the
PyTorch model in training form (unfolded, straight-through path) before the bundle is renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.bundle import BUNDLE_FORMAT, FORMATS, LABELS, MANIFEST, PRECISIONS, VARIANTS, is_bundle
from export.quantize import MODES as QUANTIZATION_MODES
from export.verify import (
    calibration_inputs,
    heldout_accuracy,
    selfcheck_inputs,
    verification_pixels,
    verify_formats,
)
from fpet import selfcheck
from fpet.atomic import current_umask, write_json_atomic
from fpet.cost import model_macs
from fpet.errors import FpetError
from fpet.pet import PetConfig
from fpet.runtimes import cpu_features
from fpet.schedule import tokens_per_block
from fpet.sessions import OPTIMIZATION as ORT_OPTIMIZATION
from fpet.sessions import create_session
from fpet.vit import VisionTransformer
from fpet.weights import sha256_file
from training.checkpoint import ADAPTERS, CONFIG, METRICS, load_run
from training.data import Preprocessing

OPSETS = range(14, 21)  # what torch's TorchScript-based exporter writes; LayerNormalization needs 17
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME, MAPS_NAME = "input", "logits", "merge_maps"


class WithMergeMaps(torch.nn.Module):
    """The model with its merge maps as a second output (`VisionTransformer.forward_explained`): the service draws
    them without torch. They come from the same hard assignments as the logits and cost a few small products."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_explained(*inputs)


@dataclass(frozen=True)
class ExportOptions:
    variant: str = "fpet"
    formats: tuple[str, ...] = ("onnx", "torchscript")
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET
    quantization: str = "dynamic"  # int8 only: see export.quantize

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise FpetError(f"unknown variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise FpetError(f"unknown format {unknown or self.formats}; choose from: {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise FpetError(f"unsupported precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.formats != ("onnx",):
            raise FpetError("int8 bundles are ONNX only (onnxruntime quantization): use --format onnx")
        if self.quantization not in QUANTIZATION_MODES:
            raise FpetError(
                f"unknown quantization {self.quantization!r}; choose one of: {', '.join(QUANTIZATION_MODES)}"
            )
        if self.opset not in OPSETS:
            raise FpetError(f"unsupported opset {self.opset}; this exporter writes opsets {OPSETS[0]}..{OPSETS[-1]}")


def run_checksum(run_dir: Path) -> str:
    """Content hash of what defines a run: its trained tensors and its config."""
    digest = hashlib.sha256()
    for name in (ADAPTERS, CONFIG):
        digest.update(sha256_file(run_dir / name).encode())
    return digest.hexdigest()


def export_onnx(
    model: VisionTransformer,
    path: Path,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    opset: int,
    maps: bool = False,
    input_names: tuple[str, ...] = (INPUT_NAME,),
) -> None:
    """Legacy (TorchScript-based) exporter: 2-3 s, exact for this model; the dynamo exporter takes ~20 s. With
    `maps`, the merge maps are a second output. Every input and output has a dynamic batch axis."""
    import onnx

    example = example if isinstance(example, tuple) else (example,)
    outputs = [OUTPUT_NAME, MAPS_NAME] if maps else [OUTPUT_NAME]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the wrapper takes the model's mode: the exporter restores the wrapper's afterwards, recursively
        exported = WithMergeMaps(model).train(model.training) if maps else model
        torch.onnx.export(
            exported,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [*input_names, *outputs]},
        )
    onnx.checker.check_model(str(path), full_check=True)


def export_torchscript(model: VisionTransformer, path: Path, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))


def export_int8(
    model: VisionTransformer, folder: Path, example: torch.Tensor, options: ExportOptions, config: dict, log
) -> dict:
    """The fp32 graph, quantized in place of the bundle's model.onnx; the fp32 file is not kept."""
    from export.quantize import quantize_int8

    fp32 = folder / "model.fp32.onnx"
    export_onnx(model, fp32, example, options.opset, maps=model.merges)
    calibration = calibration_inputs(config) if options.quantization == "static" else None
    log(f"quantizing to int8 ({options.quantization}) ...")
    try:
        return quantize_int8(fp32, folder / FORMATS["onnx"], options.quantization, calibration)
    finally:
        fp32.unlink()


def maps_identical(got: np.ndarray, expected: np.ndarray) -> float:
    """The share of images whose merge maps group the patches alike at every merge point (token numbering aside: a
    near-tie in the order of the kept tokens renumbers them without changing what merged)."""
    from fpet.mergemap import groups_of

    def groupings(maps: np.ndarray) -> list[list[list[tuple[int, ...]]]]:
        return [[sorted(tuple(g) for g in groups_of(row)) for row in image] for image in maps]

    return float(np.mean([g == e for g, e in zip(groupings(got), groupings(expected), strict=True)]))


def verify_maps(reference_maps: np.ndarray, inputs: torch.Tensor, path: Path, precision: str) -> dict:
    """The graph's merge maps against PyTorch's: identical in fp32; recorded for lower precisions, whose keys differ
    by rounding and may pick another partner for a near-tie."""
    session = create_session(path, optimization=ORT_OPTIMIZATION)
    x = inputs.numpy().astype(np.float16 if precision == "fp16" else np.float32)
    identical = maps_identical(session.run([MAPS_NAME], {INPUT_NAME: x})[0], reference_maps)
    return {"images_identical": identical, "passed": precision != "fp32" or identical == 1.0}


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to build a bundle in, readable as a served bundle must be; removed unless
    the caller renamed it into place (`replace_dir`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    session = create_session(path, optimization=ORT_OPTIMIZATION)
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32)


def torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).float().numpy()

    return run


RUNNERS = {"onnx": onnx_runner, "torchscript": torchscript_runner}


def deployed_gmacs(model: VisionTransformer) -> float:
    """MACs of the deployment form: folded LoRA costs nothing extra, adapters still run."""
    pet = model.pet if model.pet.base != "lora" else PetConfig("full")
    return model_macs(model.cfg, model.grid, list(model.merge_plan()), pet, model.num_classes) / 1e9


def check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FpetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise FpetError(f"{out} exists, is not empty and is not a bundle: refusing to replace it")


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished bundle into place; the old one is removed only once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def export_bundle(
    run_dir: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Export, verify, and only then rename the bundle into `out`; returns its manifest."""
    options = options or ExportOptions()
    run_dir, out = Path(run_dir), Path(out)
    check_destination(out)
    schedule = "none" if options.variant == "backbone" else None
    reference, config = load_run(run_dir, schedule=schedule)
    # The written-out attention: the same maths as the fused kernel (measured equal speed in onnxruntime), one Mul
    # fewer per block than the exporter's scaled_dot_product_attention, and the form runtimes' fusions look for.
    deployed = copy.deepcopy(reference).freeze_for_deployment().set_fused_attention(False)
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    deployed = deployed.to(dtype)
    pre = Preprocessing.from_dict(config["preprocessing"])
    pixels, image_names = verification_pixels(config)
    inputs = pre.to_input(pixels)
    with torch.no_grad():  # one pass for the reference logits and merge maps
        expected, expected_maps = (t.numpy() for t in reference.forward_explained(inputs))
    example = inputs[:2].to(dtype)

    with staging_folder(out) as tmp:
        files, timings, quantization = {}, {}, None
        for fmt in options.formats:
            start = time.monotonic()
            log(f"exporting {options.variant} as {fmt} ({options.precision}) ...")
            if fmt == "onnx" and options.precision == "int8":
                quantization = export_int8(deployed, tmp, example, options, config, log)
            elif fmt == "onnx":
                export_onnx(deployed, tmp / FORMATS[fmt], example, options.opset, maps=deployed.merges)
            else:
                export_torchscript(deployed, tmp / FORMATS[fmt], example)
            files[fmt] = FORMATS[fmt]
            timings[fmt] = round(time.monotonic() - start, 2)
        log(f"verifying against PyTorch on {len(image_names)} real images at batch sizes 1 and 8 ...")
        runners = {fmt: RUNNERS[fmt](tmp / name) for fmt, name in files.items()}
        verification = verify_formats(expected, inputs.to(dtype).numpy(), runners, options.precision)
        if "onnx" in files and deployed.merges:
            maps = verify_maps(expected_maps, inputs, tmp / files["onnx"], options.precision)
            verification["onnx"]["merge_maps"] = maps
            verification["onnx"]["passed"] &= maps["passed"]
        np_dtype = np.float16 if options.precision == "fp16" else np.float32
        if "onnx" in files and options.precision != "fp32":
            log("measuring accuracy on held-out images of the run's data against the fp32 model ...")
            heldout = heldout_accuracy(reference, lambda x: runners["onnx"](x.astype(np_dtype)), config)
            judge_on_heldout(verification["onnx"], heldout)
        failed = [fmt for fmt, result in verification.items() if not result["passed"]]
        manifest = build_manifest(run_dir, config, deployed, options, files, verification, image_names, timings)
        if quantization is not None:
            manifest["quantization"] = quantization
        if "onnx" in files:
            check_inputs, described = selfcheck_inputs(config, inputs)
            with torch.no_grad():
                check_logits = reference(check_inputs).numpy()
            run_here = lambda x, _: runners["onnx"](x.astype(np_dtype))  # noqa: E731
            manifest["selfcheck"] = write_selfcheck(tmp, check_inputs.numpy(), check_logits, run_here, None, described)
            passed = check_at_export(run_here, tmp, manifest)
            verification["onnx"]["selfcheck"] = passed
            if not passed["passed"] and "onnx" not in failed:
                failed.append("onnx")
        write_json_atomic(tmp / LABELS, config["labels"])
        write_json_atomic(tmp / MANIFEST, manifest)
        if failed:
            raise FpetError(
                f"verification failed for {', '.join(failed)}: {failure_reason(verification, failed)}; "
                "the bundle was not written"
            )
        replace_dir(tmp, out)
    return manifest


def judge_on_heldout(result: dict, heldout: dict | None) -> None:
    """A lower precision passes on the run's held-out images when they are here (their agreement and accuracy);
    the verification images then only inform. Without the data they decide, as before (the documented fallback)."""
    result["heldout"] = heldout
    if heldout is None:
        result["judged_on"] = "verification images (the run's data is not on this machine)"
        return
    result["judged_on"] = "held-out images of the run's data"
    result["verification_images_passed"] = result["passed"]
    result["passed"] = heldout["passed"] and result.get("merge_maps", {}).get("passed", True)


def failure_reason(verification: dict, failed: list[str]) -> str:
    parts = []
    for fmt in failed:
        result = verification[fmt]
        heldout = result.get("heldout")
        if heldout is not None and not heldout["passed"]:
            h = heldout
            parts.append(
                f"{fmt}: on {h['images']} held-out images top-1 agreement {h['top1_agreement']:.3f} (limit "
                f"{h['min_top1_agreement']}), accuracy {h['accuracy']}% against {h['reference_accuracy']}% "
                f"(limit: {h['max_drop_points']} points lower)"
            )
        elif result.get("selfcheck") is not None and not result["selfcheck"]["passed"]:
            parts.append(f"{fmt}: {selfcheck.summary(result['selfcheck'])}")
        else:
            limits = result.get("batch_sizes", {}).get("1", {}).get("thresholds")
            parts.append(
                f"{fmt}: max abs error {result['max_abs_error']:.4g}, top-1 agreement "
                f"{result['top1_agreement']:.3f} (limits {limits})"
            )
    return "; ".join(parts)


def check_at_export(run: Callable, folder: Path, manifest: dict) -> dict:
    """The new bundle's self-check where it was made (onnxruntime's CPU provider, in the bundle's own precision):
    the file reads back and the graph gives what was recorded."""
    facts = {"runtime": "onnxruntime", "cpu_features": list(cpu_features())}
    return selfcheck.check(run, folder, manifest, manifest["precision"], facts=facts)


def write_selfcheck(
    folder: Path,
    inputs: np.ndarray,
    logits: np.ndarray,
    run: Callable,
    tasks: np.ndarray | None,
    described: str,
    classes: np.ndarray | None = None,
) -> dict:
    """selfcheck.npz (the reference model's logits, and the exported graph's here through `run`) and its manifest
    entry: what it holds and the tolerance for each compute precision."""
    exported = np.concatenate(
        [run(inputs[i : i + 8], None if tasks is None else tasks[i : i + 8]) for i in range(0, len(inputs), 8)]
    )
    selfcheck.write(folder, inputs, logits, exported, tasks, classes)
    return {
        "file": selfcheck.FILE,
        "images": len(inputs),
        "inputs": described,
        "compared_with": "the exported graph's logits on the exporting machine, for a runtime computing the "
        "bundle's own precision; the reference model's (PyTorch fp32, training form, eval mode) for another",
        "tolerances": selfcheck.TOLERANCES,
    }


def merge_maps_info(model: VisionTransformer) -> dict:
    """What the service needs to read the merge-maps output without torch: the patch grid and the merge points."""
    steps = [step for step in model.merge_plan() if step is not None]
    return {
        "output": MAPS_NAME,
        "shape": ["batch", len(steps), model.grid[0] * model.grid[1]],
        "grid": list(model.grid),
        "patch_size": model.cfg.patch_size,
        "points": [
            {"block": s.block, "method": s.method, "tokens_before": s.tokens_in, "tokens_after": s.tokens_in - s.merged}
            for s in steps
        ],
    }


def run_source(run_dir: Path) -> dict:
    """Where a bundle's trained tensors came from: the run folder, its checksum and its measured accuracy."""
    metrics = {}
    if (run_dir / METRICS).exists():
        full = json.loads((run_dir / METRICS).read_text())
        metrics = {k: full[k] for k in ("eval_split", "val", "test") if k in full}
    return {"path": str(run_dir.resolve()), "sha256": run_checksum(run_dir), "metrics": metrics}


def graph_manifest(config: dict, model: VisionTransformer, precision: str, opset: int, files: dict) -> dict:
    """The manifest fields that describe the exported graph and how to feed it, for single- and multi-task bundles."""
    import onnx
    import onnxruntime

    size = config["preprocessing"]["img_size"]
    return {
        "backbone": {k: config["backbone"][k] for k in ("name", "weights", "tensors_sha256")},
        "method": config["method"],
        "schedule": model.schedule.spec,
        "tokens_per_block": tokens_per_block(list(model.merge_plan()), model.grid),
        "gmacs": round(deployed_gmacs(model), 4),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "dtype": "float16" if precision == "fp16" else "float32",  # int8 bundles take float input
        },
        "merge_maps": merge_maps_info(model) if "onnx" in files and model.merges else None,
        "img_size": size,
        "preprocessing": config["preprocessing"],
        "precision": precision,
        "opset": opset if "onnx" in files else None,
        "onnxruntime": {"graph_optimization_level": ORT_OPTIMIZATION},
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def build_manifest(
    run_dir: Path,
    config: dict,
    model: VisionTransformer,
    options: ExportOptions,
    files: dict,
    verification: dict,
    image_names: list[str],
    timings: dict,
) -> dict:
    source = run_source(run_dir)
    return {
        "bundle_format": BUNDLE_FORMAT,
        "name": run_dir.resolve().name,
        "version": source["sha256"][:12],
        "variant": options.variant,
        **graph_manifest(config, model, options.precision, options.opset, files),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(config["labels"])]},
        "num_classes": len(config["labels"]),
        "files": {**files, "labels": LABELS},
        "source_run": source,
        "verification": {
            "images": image_names,
            "reference": "PyTorch fp32, training form (unfolded LoRA, straight-through merges), eval mode",
            "formats": verification,
            "checked_on": "CPUExecutionProvider"
            + (" (fp16 on a GPU is not checked here)" if options.precision == "fp16" else ""),
            "cpu_features": list(cpu_features()),
        },
        "export_seconds": timings,
    }
