"""Checking an exported graph against the PyTorch model it came from, on real images, before it may be served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fpet import selfcheck
from fpet.pretrained import sample_photo_files
from training.data import Preprocessing, Source, label_groups, open_split

BATCH_SIZES = (1, 8)
# fp32 must agree on every image that is not a near-tie (fpet.selfcheck.compare). A lower precision is judged where it
# matters, on held-out images of the run's own data: its top-1 agreement with the fp32 model and its accuracy (the
# verification images, mostly off-task photos with many near-ties, say little about the task). Where the run's data
# is not on the machine, the verification images decide, with these limits: fp16 matches in fp32 (fpet.merge), so it
# must agree too, its logits differing by rounding only; int8 moves logits further.
THRESHOLDS = {
    "fp32": {"max_abs_error": 1e-3, "top1_agreement": 1.0},
    "fp16": {"max_abs_error": 0.25, "top1_agreement": 1.0},
    "int8": {"max_abs_error": 2.0, "top1_agreement": 0.9},
}
DATA_IMAGES = 24
HELDOUT_IMAGES = 1000
HELDOUT_MAX_DROP = 1.5  # accuracy points; the paired difference on 1000 images has a standard error near 0.4
HELDOUT_MIN_AGREEMENT = 0.9  # top-1 agreement with the fp32 model on the held-out images


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
    found = heldout_inputs(config)
    if found is None:
        return None
    inputs, labels = found
    with torch.no_grad():
        expected = torch.cat([reference(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return heldout_result(expected.numpy(), run_batches(run, inputs.numpy(), batch_size), labels.numpy())


def heldout_inputs(config: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first held-out test images of the run's data, preprocessed, and their labels; None without the data."""
    source = run_split(config, "test")
    if source is None:
        return None
    return model_inputs(source, list(range(min(HELDOUT_IMAGES, len(source)))), config)


def heldout_result(expected: np.ndarray, got: np.ndarray, labels: np.ndarray) -> dict:
    """The exported graph's logits (`got`) against the reference's on held-out images: accuracy and agreement."""
    reference_acc = float((expected.argmax(-1) == labels).mean()) * 100
    exported_acc = float((got.argmax(-1) == labels).mean()) * 100
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    return {
        "split": "test",
        "images": len(labels),
        "reference_accuracy": round(reference_acc, 2),
        "accuracy": round(exported_acc, 2),
        "top1_agreement": agreement,
        "max_drop_points": HELDOUT_MAX_DROP,
        "min_top1_agreement": HELDOUT_MIN_AGREEMENT,
        "passed": reference_acc - exported_acc <= HELDOUT_MAX_DROP and agreement >= HELDOUT_MIN_AGREEMENT,
    }


def selfcheck_inputs(config: dict, fallback: torch.Tensor, count: int = selfcheck.IMAGES) -> tuple[torch.Tensor, str]:
    """What a bundle's self-check runs: the first test images of the run's data, or, where that data is not on this
    machine, the first verification images (the packaged photos)."""
    source = run_split(config, "test")
    if source is not None and len(source):
        inputs, _ = model_inputs(source, list(range(min(count, len(source)))), config)
        return inputs, f"the first {len(inputs)} test images of {Path(config['train']['data']).name}"
    return fallback[:count], f"the first {len(fallback[:count])} verification images"


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict:
    return selfcheck.compare(reference, candidate, THRESHOLDS[precision])


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
