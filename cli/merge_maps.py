"""`fpet visualize`: merge maps of a run (PyTorch) or of exported bundles (onnxruntime), drawn for given images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from export.bundle import is_bundle, read_manifest
from fpet import mergemap, selfcheck
from fpet.errors import FpetError
from fpet.imaging import normalize, resize_rgb

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # input -> logits, maps (None: no merges)


@dataclass
class Explainer:
    """One variant: how to preprocess for it and what it predicts and merges."""

    name: str
    labels: list[str]
    preprocessing: dict
    predict: Predict
    grid: tuple[int, int] | None = None
    points: list[dict] | None = None


def from_bundle(path: Path) -> Explainer:
    from service.runtime import ModelRunner

    if "onnx" not in read_manifest(path)["files"]:
        raise FpetError(f"{path} has no ONNX graph to explain")
    runner = ModelRunner(path, providers="cpu")
    check = runner.self_check(8)
    if not check["passed"]:
        raise FpetError(f"{path}: {selfcheck.summary(check)}")
    if runner.single is None:
        raise FpetError(
            f"{path} is a multi-task bundle: visualize one of its tasks' runs, or serve it and POST "
            "/models/fpet/explain?task=TASK"
        )
    maps = runner.merge_maps
    grid = tuple(maps["grid"]) if maps else None
    pre = {"img_size": runner.img_size, "mean": runner.mean, "std": runner.std}
    return Explainer(runner.name, runner.single.labels, pre, runner.explain, grid, maps and maps["points"])


def from_run(path: Path, schedule: str | None = None) -> Explainer:
    import torch

    from export.exporter import merge_maps_info
    from training.checkpoint import load_run
    from training.data import Preprocessing

    model, config = load_run(path, schedule=schedule)
    model.eval()
    info = merge_maps_info(model) if model.merges else None

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.no_grad():
            logits, maps = model.forward_explained(torch.from_numpy(x))
        return logits.numpy(), maps.numpy() if info else None

    pre = Preprocessing.from_dict(config["preprocessing"]).to_dict()
    methods = {point.method for point in model.schedule.points}
    name = "backbone" if not methods else "tome" if methods == {"tome"} else "fpet"
    return Explainer(name, config["labels"], pre, predict, info and tuple(info["grid"]), info and info["points"])


def explainers(source: str | None, backbone: str | None) -> tuple[Explainer, Explainer | None]:
    """The merging variant and, for its label beside, the backbone: from a run, from bundles, or the default model."""
    if source is None:
        from export.defaults import ensure_default_bundles

        bundles = ensure_default_bundles(log=lambda _: None)
        return from_bundle(bundles["fpet"]), from_bundle(bundles["backbone"])
    path = Path(source)
    if is_bundle(path):
        sibling = Path(backbone) if backbone else path.parent / "backbone"
        return from_bundle(path), from_bundle(sibling) if is_bundle(sibling) and sibling != path else None
    if (path / "config.json").is_file():
        return from_run(path), from_run(path, schedule="none")
    raise FpetError(f"{source} is neither a run folder nor a bundle")


def top1(explainer: Explainer, logits: np.ndarray) -> str:
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return f"{explainer.name}: {explainer.labels[int(p.argmax())]} ({100 * p.max():.1f}%)"


def visualize(source: str | None, images: list[str], out: str, backbone: str | None = None) -> list[Path]:
    """One PNG per image and merge point, and a side-by-side sheet per image; returns the files written."""
    main, other = explainers(source, backbone)
    if main.grid is None:
        raise FpetError(f"the {main.name} model merges no tokens: there is no merge map to draw")
    size = main.preprocessing["img_size"]
    written = []
    for name, stem_name in zip(images, distinct_stems(images), strict=True):
        try:
            with Image.open(name) as image:
                pixels = resize_rgb(image, size)
        except (OSError, UnidentifiedImageError) as exc:
            raise FpetError(f"cannot read image {name}: {exc}") from None
        x = normalize(pixels[None], main.preprocessing["mean"], main.preprocessing["std"])
        logits, maps = main.predict(x)
        captions = [top1(main, logits[0])]
        if other is not None:
            captions.append(top1(other, other.predict(x)[0][0]))
        captions.append(
            ", ".join(
                f"block {p['block']}: {p['tokens_before'] - 1} -> {p['tokens_after'] - 1} tokens" for p in main.points
            )
        )
        hwc = pixels.transpose(1, 2, 0)
        stem = Path(out) / stem_name
        for row, point in zip(maps[0], main.points, strict=True):
            written.append(save_png(mergemap.draw(hwc, row, main.grid), stem, f"block{point['block']}"))
        written.append(save_png(mergemap.sheet(hwc, maps[0], main.grid, main.points, captions), stem, "sheet"))
    return written


def distinct_stems(images: list[str]) -> list[str]:
    """File-name stems for the outputs, one per image: `a/x.png` and `b/x.jpg` must not write to the same files."""
    taken: set[str] = set()
    stems = []
    for name in images:
        stem, n = Path(name).stem, 1
        while (stem if n == 1 else f"{stem}-{n}") in taken:
            n += 1
        stems.append(stem if n == 1 else f"{stem}-{n}")
        taken.add(stems[-1])
    return stems


def save_png(picture: Image.Image, stem: Path, suffix: str) -> Path:
    from fpet.atomic import write_atomic

    target = stem.with_name(f"{stem.name}_{suffix}.png")
    write_atomic(target, lambda tmp: picture.save(tmp, format="PNG"))
    return target
