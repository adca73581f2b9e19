"""A bundle's self-check: a few preprocessed on-task images and the reference model's logits for them, written by
export as `selfcheck.npz`, so that wherever the bundle is loaded the runtime in use can show it still computes the
model. Export verifies on the exporting machine; the numerics that matter are those of the machine, runtime, precision
and instruction set that serve it (int8 kernels differ between CPUs with and without VNNI, bf16 and fp16 round).

Top-1 agreement is judged as export judges it (`compare`): on images that are not near-ties for the tolerance. No
torch here: the service reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fpet.errors import FpetError

FILE = "selfcheck.npz"
IMAGES = 16
# By the precision the runtime computes in (not the bundle's): an fp32 bundle that OpenVINO runs in bf16 is held to
# bf16's tolerance against the reference model: OpenVINO's bf16 run of the default model differed from onnxruntime's
# fp32 by at most 0.91 in logits on 256 test images (logits span -15 to 16), 0.14 on its 16 self-check images. An int8
# or fp16 bundle computed as such is held against its own outputs at export, which another runtime or CPU computes with
# other kernels: on the default model's static int8 bundle OpenVINO differed from onnxruntime by up to 1.86 here, so
# int8 allows 3 (top-1 agreement stays the sharper test).
TOLERANCES = {
    "fp32": {"max_abs_error": 1e-3, "top1_agreement": 1.0},
    "fp16": {"max_abs_error": 0.25, "top1_agreement": 1.0},
    "bf16": {"max_abs_error": 1.0, "top1_agreement": 1.0},
    "int8": {"max_abs_error": 3.0, "top1_agreement": 0.9},
}
# A task's logits past its own classes in a multi-task graph: the same low value on both sides, never the top-1,
# and no part of a model's logit spread.
PADDING = np.float32(-1e9)
# Where a precision's allowance exceeds a weak model's whole logit spread, the model is judged by the error actually
# seen instead, which must stay under this share of its typical spread: rounding errs by far less (bf16 by 0.013 on a
# tiny test model whose logits span about 1), a graph with swapped or scrambled classes by about the spread.
ERROR_SHARE_OF_SPREAD = 0.25


def compare(reference: np.ndarray, candidate: np.ndarray, limits: dict) -> dict:
    """Max abs logit error, and top-1 agreement judged on the images that are not near-ties: where the reference's
    two best logits are closer than the allowed error, either answer is within tolerance. When most images are
    near-ties (int8's or bf16's allowance can exceed a weak model's whole logit spread), the allowance cannot tell a
    rounding flip from a wrong graph: ties are then judged at twice the error seen (a flip it explains), provided that
    error is small beside the model's spread (`ERROR_SHARE_OF_SPREAD`); otherwise every image is judged."""
    error = float(np.abs(reference - candidate).max())
    same = reference.argmax(-1) == candidate.argmax(-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    ties = margin <= limits["max_abs_error"]
    judged, tie_margin = ~ties, limits["max_abs_error"]
    if 2 * ties.sum() > len(ties):
        real = np.where(reference == PADDING, np.nan, reference)
        spread = float(np.median(np.nanmax(real, -1) - np.nanmin(real, -1)))
        explained = error <= ERROR_SHARE_OF_SPREAD * spread
        tie_margin = 2 * error if explained else 0.0
        judged = margin > tie_margin
    agreement = float(same[judged].mean()) if judged.any() else 1.0
    return {
        "max_abs_error": error,
        "top1_agreement": agreement,
        "top1_agreement_all_images": float(same.mean()),
        "near_ties": int(ties.sum()),
        "ties_judged_within": tie_margin,
        "thresholds": limits,
        "passed": error <= limits["max_abs_error"] and agreement >= limits["top1_agreement"],
    }


def write(
    folder: Path,
    inputs: np.ndarray,
    logits: np.ndarray,
    exported: np.ndarray,
    tasks: np.ndarray | None = None,
    classes: np.ndarray | None = None,
) -> None:
    """`logits`: the reference model's; `exported`: the exported graph's on the exporting machine, as verified there.
    `tasks` and `classes` (multi-task bundles): each image's task index and how many of its logits are its task's (the
    rest are the graph's padding, and are not compared)."""
    arrays = {
        "input": inputs.astype(np.float32),
        "logits": logits.astype(np.float32),
        "exported": exported.astype(np.float32),
    }
    if tasks is not None:
        arrays["task"], arrays["classes"] = tasks.astype(np.int64), classes.astype(np.int64)
    with (folder / FILE).open("wb") as f:
        np.savez_compressed(f, **arrays)


def read(
    bundle: Path, manifest: dict, precision: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The inputs, the logits to compare with, task indices and class counts; never unpickles (plain arrays only).
    A runtime computing the bundle's own precision is compared with the exported graph's logits on the exporting
    machine (what differs then is the machine: instruction set, kernels); one computing another precision (bf16 of an
    fp32 bundle) with the reference model's."""
    path = bundle / manifest["selfcheck"]["file"]
    own = precision == manifest["precision"]
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, logits = data["input"], data["exported" if own else "logits"]
            tasks = data["task"] if "task" in data.files else None
            classes = data["classes"] if "classes" in data.files else None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise FpetError(f"{path} is not a readable self-check ({exc})") from None
    if inputs.ndim != 4 or logits.ndim != 2 or len(inputs) != len(logits) or len(inputs) == 0:
        raise FpetError(f"{path} holds arrays of shapes {inputs.shape} and {logits.shape}: not a self-check")
    if tasks is not None and (tasks.shape != (len(inputs),) or classes is None or classes.shape != tasks.shape):
        raise FpetError(f"{path}: task indices or class counts do not match its {len(inputs)} images")
    return inputs, logits, tasks, classes


def check(
    run: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    bundle: Path,
    manifest: dict,
    precision: str,
    batch_size: int = 8,
    facts: dict | None = None,
) -> dict:
    """Run the bundle's self-check through `run` (images, task indices -> logits) computing in `precision`.
    `facts` (runtime, CPU features) go into the result, so that a failure says where it happened. A bundle exported
    before self-checks passes with a note that it has none."""
    if "selfcheck" not in manifest:
        return {"passed": True, "skipped": "the bundle has no self-check (exported before bundle format 6)"}
    inputs, expected, tasks, classes = read(bundle, manifest, precision)
    chunks = []
    for i in range(0, len(inputs), batch_size):
        chunks.append(run(inputs[i : i + batch_size], None if tasks is None else tasks[i : i + batch_size]))
    got = np.concatenate(chunks)[:, : expected.shape[1]].astype(np.float32)
    if got.shape != expected.shape:
        raise FpetError(f"{bundle}: the graph gives logits of shape {got.shape}, its self-check {expected.shape}")
    if classes is not None:  # another task's padding columns: the same low value on both sides, never the top-1
        padding = np.arange(expected.shape[1])[None, :] >= classes[:, None]
        expected = np.where(padding, PADDING, expected)
        got = np.where(padding, PADDING, got)
    limits = manifest["selfcheck"]["tolerances"].get(precision) or TOLERANCES[precision]
    result = compare(expected, got, limits)
    return {**result, "images": len(inputs), "compute_precision": precision, **(facts or {})}


def summary(result: dict) -> str:
    """One line for a reason, a log or an error."""
    if result.get("skipped"):
        return result["skipped"]
    if result.get("error"):
        return f"self-check failed: {result['error']}"
    where = ", ".join(f"{k} {result[k]}" for k in ("runtime", "compute_precision") if result.get(k))
    features = ",".join(result.get("cpu_features") or []) or "none seen"
    verdict = "passed" if result["passed"] else "failed"
    return (
        f"self-check {verdict}: max abs error {result['max_abs_error']:.4g} (limit "
        f"{result['thresholds']['max_abs_error']}), top-1 agreement {result['top1_agreement']:.3f} (limit "
        f"{result['thresholds']['top1_agreement']}) on {result['images']} images; {where}; CPU features "
        f"{features}"
    )
