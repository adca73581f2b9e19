"""Checking an exported graph against the PyTorch model it came from, on real images, before it may be served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fpet.pretrained import sample_photo_files
from training.data import Preprocessing, open_split

BATCH_SIZES = (1, 8)
# fp32 must agree on every image; fp16 is judged by top-1 agreement, since near-ties may flip in half precision.
THRESHOLDS = {
    "fp32": {"max_abs_error": 1e-3, "top1_agreement": 1.0},
    "fp16": {"max_abs_error": 0.25, "top1_agreement": 0.9},
}
DATA_IMAGES = 8


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
    data = Path(config.get("train", {}).get("data", "") or "/nonexistent")
    if data.is_dir():
        test = open_split(data, "test", fmt=config["train"].get("data_format", "auto"), classes=config["labels"])
        if test is not None:
            chosen = list(range(min(DATA_IMAGES, len(test))))
            decoded = test.decode(chosen, pre)
            pixels += list(decoded.pixels.numpy())
            names += [f"{data.name} test image {i}" for i in chosen[: len(decoded)]]
    keep = len(pixels) - len(pixels) % max(BATCH_SIZES)
    return torch.from_numpy(np.stack(pixels[:keep])), names[:keep]


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict:
    limits = THRESHOLDS[precision]
    error = float(np.abs(reference - candidate).max())
    agreement = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    return {
        "max_abs_error": error,
        "top1_agreement": agreement,
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
