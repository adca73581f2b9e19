"""The bundle format: what export writes and the service reads. Pure Python, no torch, so the service stays light.

A bundle is one folder per variant: `model.onnx`, `model.ts` (TorchScript), `labels.json` and `manifest.json`. A
multi-task bundle (`export.multitask`) has one graph for several tasks, and `labels.json` maps each task to its labels.
"""

from __future__ import annotations

import json
from pathlib import Path

from fpet.errors import FpetError

# 2: fpet graphs have a second output, the merge maps (manifest `merge_maps`); 3: several tasks in one graph (a
# `task` input, manifest `tasks`, labels per task); 4 and 5 (single- and multi-task): the merge maps follow the
# matching by gathers alone and the scores are no matrix product, so runtimes keep the matching in fp32 (fpet.merge);
# 6 and 7 (single- and multi-task): a self-check (`selfcheck.npz`, manifest `selfcheck`; fpet.selfcheck)
BUNDLE_FORMAT = 6
MULTITASK_BUNDLE_FORMAT = 7
SAFE_LOWERING_FORMAT = 4  # from here on a runtime may lower everything but the matching
NEWEST_FORMAT = max(BUNDLE_FORMAT, MULTITASK_BUNDLE_FORMAT)
MANIFEST, LABELS, ONNX_FILE, TORCHSCRIPT_FILE = "manifest.json", "labels.json", "model.onnx", "model.ts"
VARIANTS = ("fpet", "backbone")
FORMATS = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
PRECISIONS = ("fp32", "fp16", "int8")


def parse_formats(text: str | None, precision: str) -> tuple[str, ...]:
    """Comma-separated formats; by default ONNX and TorchScript, ONNX alone for int8 (onnxruntime's quantized graph
    has no TorchScript twin). `triton` stands alone: it writes a whole model repository, both variants included."""
    default = "onnx" if precision == "int8" else "onnx,torchscript"
    formats = tuple(f.strip() for f in (text or default).split(",") if f.strip())
    if "triton" in formats and formats != ("triton",):
        raise FpetError("--format triton writes a whole model repository: give it alone")
    return formats


def is_bundle(path: Path) -> bool:
    """A folder export wrote: its manifest names a bundle format. A `manifest.json` alone could be anyone's (a web
    app's), and export and pull replace bundles whole."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "bundle_format" in manifest


def read_manifest(bundle_dir: str | Path) -> dict:
    """The manifest of a bundle, refusing folders that are not bundles or come from a newer fpet."""
    bundle_dir = Path(bundle_dir)
    if not is_bundle(bundle_dir):
        raise FpetError(f"{bundle_dir} is not a model bundle (no {MANIFEST} with a bundle format)")
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    version = manifest.get("bundle_format")
    if not isinstance(version, int) or version > NEWEST_FORMAT:
        raise FpetError(f"{bundle_dir} has bundle format {version!r}; this fpet reads up to {NEWEST_FORMAT}")
    for name in manifest.get("files", {}).values():
        if not (bundle_dir / name).is_file():
            raise FpetError(f"bundle {bundle_dir} lacks {name}")
    return manifest


def runtime_facts(manifest: dict) -> dict:
    """What `fpet.runtimes.choose` must know of a bundle: its precision, its int8 form, and whether its graph keeps
    the matching in fp32 when a runtime lowers the rest (formats 4 and 5, or no merges). Static int8 from before the
    symmetric QDQ (uint8 zero points) is its own form: OpenVINO runs it slower than bf16."""
    quantization = manifest.get("quantization") or {}
    mode = quantization.get("mode")
    if mode == "static" and "symmetric" not in quantization.get("activations", ""):
        mode = "static uint8"
    merges = manifest.get("merge_maps") is not None or manifest.get("schedule", "none") != "none"
    return {
        "bundle_precision": manifest["precision"],
        "quantization": mode,
        "lowers_safely": not merges or manifest["bundle_format"] >= SAFE_LOWERING_FORMAT,
    }
