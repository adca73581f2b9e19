"""Merge maps as pictures and as data, from a [merge points, patches] array of token indices (the second output of
an exported fpet graph, or `VisionTransformer.forward_explained`). NumPy and Pillow only: the service draws them
without torch.

The picture is the one ToMe made familiar: every group of merged patches is filled with its mean colour and the
borders between groups are drawn, so large flat regions show as few large cells and detail as many small ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BORDER = (255, 255, 255)
SCALE = 3  # model pixels to picture pixels: 112 px inputs draw at 336 px


def groups_of(token_of_patch: np.ndarray) -> list[list[int]]:
    """Patch indices (row-major) of every token that holds at least one patch, in token order."""
    order = np.argsort(token_of_patch, kind="stable")
    tokens, starts = np.unique(token_of_patch[order], return_index=True)
    return [part.tolist() for part in np.split(order, starts[1:])] if len(tokens) else []


def plan_json(maps: np.ndarray, points: Sequence[dict]) -> list[dict]:
    """The merge plan of one image: per merge point, its block, token counts and groups of patches."""
    return [
        {**{k: point[k] for k in ("block", "method", "tokens_before", "tokens_after")}, "groups": groups_of(row)}
        for row, point in zip(maps, points, strict=True)
    ]


def draw(pixels: np.ndarray, token_of_patch: np.ndarray, grid: tuple[int, int], scale: int = SCALE) -> Image.Image:
    """pixels: the model's input image, uint8 [S, S, 3]; each group filled with its mean colour, borders drawn."""
    gh, gw = grid
    size = pixels.shape[0]
    ph, pw = size // gh, size // gw
    cells = pixels[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw, 3).astype(np.float64).mean(axis=(1, 3))
    labels = token_of_patch.reshape(gh, gw)
    flat = cells.reshape(-1, 3)
    means = np.zeros((int(labels.max()) + 1, 3))
    np.add.at(means, labels.ravel(), flat)
    counts = np.bincount(labels.ravel(), minlength=len(means))[:, None]
    filled = (means / np.maximum(counts, 1))[labels]  # [gh, gw, 3]
    picture = np.repeat(np.repeat(filled, ph * scale, axis=0), pw * scale, axis=1).astype(np.uint8)
    image = Image.fromarray(picture)
    pen = ImageDraw.Draw(image)
    cell_h, cell_w = ph * scale, pw * scale
    for r in range(gh):
        for c in range(gw):
            if c + 1 < gw and labels[r, c] != labels[r, c + 1]:
                x = (c + 1) * cell_w
                pen.line([(x, r * cell_h), (x, (r + 1) * cell_h)], fill=BORDER, width=1)
            if r + 1 < gh and labels[r, c] != labels[r + 1, c]:
                y = (r + 1) * cell_h
                pen.line([(c * cell_w, y), ((c + 1) * cell_w, y)], fill=BORDER, width=1)
    return image


def sheet(
    pixels: np.ndarray,
    maps: np.ndarray,
    grid: tuple[int, int],
    points: Sequence[dict],
    captions: Sequence[str],
    scale: int = SCALE,
) -> Image.Image:
    """Side by side: the input, then the map after each merge point, with captions (labels, token counts) below."""
    original = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    panels = [original] + [draw(pixels, row, grid, scale) for row in maps]
    titles = ["input"] + [f"after block {p['block']}: {p['tokens_after'] - 1} tokens" for p in points]
    font = ImageFont.load_default()
    pad, line = 8, 14
    width = sum(p.width for p in panels) + pad * (len(panels) + 1)
    height = panels[0].height + pad * 3 + line * (1 + len(captions))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    x = pad
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(panel, (x, pad))
        pen.text((x, pad * 2 + panel.height), title, fill=(0, 0, 0), font=font)
        x += panel.width + pad
    for i, caption in enumerate(captions):
        pen.text((pad, pad * 2 + panels[0].height + line * (i + 1)), caption, fill=(0, 0, 0), font=font)
    return canvas
