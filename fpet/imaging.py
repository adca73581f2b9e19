"""Image preprocessing shared by training and serving, with numpy and Pillow only (no torch), so the service
applies exactly what training applied: EXIF rotation, RGB, bicubic resize, [0, 1] scaling, mean/std."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF rotation applied, grey replicated, alpha dropped, 16-bit rescaled.

    No copy where none is needed (the rotation is done in place, an RGB image is returned as it is): each copy of a
    40 MP image is 160 MB of Pillow's 4-byte pixels."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def draft(image: Image.Image, size: int) -> Image.Image:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (in the DCT domain) while staying at least size x size.

    A camera photo then decodes in a fraction of the time and the bicubic resize starts from a small image. It acts
    only before the pixels are loaded and only on JPEGs; training and serving both pass through it (`resize_rgb`, and
    the service's decoder), so they see the same pixels.
    """
    if image.format == "JPEG":
        image.draft(image.mode, (size, size))
    return image


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [3, size, size]: the whole image resized (bicubic, no crop), as the FPET paper preprocesses."""
    image = to_rgb(draft(image, size)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [B, 3, S, S] to float32 model input: x / 255, then (x - mean) / std per channel."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (x - mean_a) / std_a
