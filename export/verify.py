"""Checking an exported graph against the PyTorch model it came from, on real images, before it may be served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fpet.pretrained import sample_photo_files
from training.data import Preprocessing, Source, label_groups, open_split

BATCH_SIZES = (1, 8)
# fp32 must agree on every image that is not a near-tie (see compare). fp16 matches in fp32 (fpet.merge), so it must
# too; its logits differ by rounding only. int8 moves logits further: it is judged by top-1 agreement and, where the
# run's data is here, by its accuracy on held-out images against the fp32 model's.
THRESHOLDS = {
    "fp32": {"max_abs_error": 1e-3, "top1_agreement": 1.0},
    "fp16": {"max_abs_error": 0.25, "top1_agreement": 1.0},
    "int8": {"max_abs_error": 2.0, "top1_agreement": 0.9},
}
DATA_IMAGES = 24
HELDOUT_IMAGES = 1000
HELDOUT_MAX_DROP = 1.5  # accuracy points; the paired difference on 1000 images has a standard error near 0.4


def verification_pixels(config: dict) -> tuple[torch.Tensor, list[str]]:
    """uint8 images through the run's preprocessing: the packaged photos, their mirror images, and the first test
    images of the run's own data when it is on this machine. A multiple of the largest batch size."""
    pre = Preprocessing.from_dict(config["preprocessing"])
    pixels, names = [], []
    for item in sample_photo_files():
        with item.open("rb") as f:
            photo = Image.open(f).convert("RGB")
            pixels += [pre.resize_image(photo), pre.resize_image(ImageOps.mirror(photo))]
            names += [item.name, f"mirrored {item.name}"]
    test = run_split(config, "test")
    if test is not None:
        chosen = list(range(min(DATA_IMAGES, len(test))))
        decoded = test.decode(chosen, pre)
        pixels += list(decoded.pixels.numpy())
        names += [f"{Path(config['train']['data']).name} test image {i}" for i in chosen[: len(decoded)]]
    keep = len(pixels) - len(pixels) % max(BATCH_SIZES)
    return torch.from_numpy(np.stack(pixels[:keep])), names[:keep]


def run_split(config: dict, split: str) -> Source | None:
    """A split of the run's own data, or None where that data is not on this machine."""
    data = Path(config.get("train", {}).get("data", "") or "/nonexistent")
    if not data.is_dir():
        return None
    fmt = config["train"].get("data_format", "auto")
    return open_split(data, split, fmt=fmt, classes=config["labels"], groups=label_groups(config))


def model_inputs(source: Source, index: list[int], config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pre = Preprocessing.from_dict(config["preprocessing"])
    decoded = source.decode(index, pre)
    return pre.to_input(decoded.pixels), decoded.labels


def calibration_inputs(config: dict, n: int = 128) -> np.ndarray | None:
    """Random training images of the run (fixed seed), preprocessed: what static int8 calibrates on."""
    source = run_split(config, "train")
    if source is None:
        return None
    index = sorted(np.random.default_rng(0).choice(len(source), min(n, len(source)), replace=False).tolist())
    return model_inputs(source, index, config)[0].numpy()


def heldout_accuracy(reference, run, config: dict, batch_size: int = 64) -> dict | None:
    """Accuracy of the exported graph and of the PyTorch reference on the first held-out test images."""
    source = run_split(config, "test")
    if source is None:
        return None
    inputs, labels = model_inputs(source, list(range(min(HELDOUT_IMAGES, len(source)))), config)
    with torch.no_grad():
        expected = torch.cat([reference(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    got = run_batches(run, inputs.numpy(), batch_size)
    reference_acc = float((expected.argmax(-1) == labels).float().mean()) * 100
    exported_acc = float((got.argmax(-1) == labels.numpy()).mean()) * 100
    return {
        "split": "test",
        "images": len(labels),
        "reference_accuracy": round(reference_acc, 2),
        "accuracy": round(exported_acc, 2),
        "top1_agreement": float((got.argmax(-1) == expected.argmax(-1).numpy()).mean()),
        "max_drop_points": HELDOUT_MAX_DROP,
        "passed": reference_acc - exported_acc <= HELDOUT_MAX_DROP,
    }


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict:
    """Max abs logit error, and top-1 agreement judged on the images that are not near-ties: where the reference's
    two best logits are closer than the allowed error, either answer is within tolerance (the packaged photos are
    off-task for most runs, and their top two can be that close). When most images are near-ties (int8's allowance
    can exceed a weak model's whole logit spread), that would leave too little to judge: agreement is then taken on
    every image, so a graph with its classes swapped cannot pass on ties alone."""
    limits = THRESHOLDS[precision]
    error = float(np.abs(reference - candidate).max())
    same = reference.argmax(-1) == candidate.argmax(-1)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    ties = top2[:, 1] - top2[:, 0] <= limits["max_abs_error"]
    judged = ~ties if 2 * ties.sum() <= len(ties) else np.ones_like(ties)
    agreement = float(same[judged].mean())
    return {
        "max_abs_error": error,
        "top1_agreement": agreement,
        "top1_agreement_all_images": float(same.mean()),
        "near_ties": int(ties.sum()),
        "thresholds": limits,
        "passed": error <= limits["max_abs_error"] and agreement >= limits["top1_agreement"],
    }


def run_batches(run, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def verify_formats(reference: np.ndarray, inputs: np.ndarray, runners: dict, precision: str) -> dict:
    """Per format and batch size, the exported output against the PyTorch reference logits."""
    results = {}
    for fmt, run in runners.items():
        per_batch = {str(b): compare(reference, run_batches(run, inputs, b), precision) for b in BATCH_SIZES}
        results[fmt] = {
            "batch_sizes": per_batch,
            "max_abs_error": max(r["max_abs_error"] for r in per_batch.values()),
            "top1_agreement": min(r["top1_agreement"] for r in per_batch.values()),
            "passed": all(r["passed"] for r in per_batch.values()),
        }
    return results
