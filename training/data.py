"""Labelled image sets (image folders, VTAB-1k file lists, Fashion-MNIST IDX files) and the paper's preprocessing.

Images are decoded and resized once, up front, into a uint8 tensor: VTAB-1k-sized sets fit in memory easily, and
with no augmentation (the paper's protocol) every epoch then costs only the model.
"""

from __future__ import annotations

import gzip
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fpet.errors import FpetError
from fpet.imaging import resize_rgb

log = logging.getLogger("fpet.data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
NORMALIZATIONS = {"none": None, "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@dataclass(frozen=True)
class Preprocessing:
    """What the service must do to an image to reproduce training: resize (no crop), scale to [0, 1], normalise."""

    img_size: int
    resize: str = "bicubic"
    normalize: str = "none"  # the paper feeds [0, 1] pixels; "imagenet" for backbones trained on normalised input

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise FpetError(f"unknown normalisation {self.normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")

    def to_dict(self) -> dict:
        mean_std = NORMALIZATIONS[self.normalize]
        return {
            **asdict(self),
            "channels": "RGB",
            "scale": 1 / 255,
            "mean": list(mean_std[0]) if mean_std else [0.0, 0.0, 0.0],
            "std": list(mean_std[1]) if mean_std else [1.0, 1.0, 1.0],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(img_size=d["img_size"], resize=d["resize"], normalize=d["normalize"])

    def resize_image(self, image: Image.Image) -> np.ndarray:
        """RGB uint8 [3, S, S]."""
        return resize_rgb(image, self.img_size)

    def to_input(self, pixels: Tensor) -> Tensor:
        """uint8 [B, 3, S, S] to the model's float input (on the pixels' device)."""
        x = pixels.float() / 255.0
        mean_std = NORMALIZATIONS[self.normalize]
        if mean_std is None:
            return x
        mean = torch.tensor(mean_std[0], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(mean_std[1], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass
class ImageSet:
    pixels: Tensor  # uint8 [N, 3, S, S]
    labels: Tensor  # int64 [N]
    classes: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    """A split before decoding: labels and a way to open each image, so only the images used are decoded."""

    labels: list[int]
    classes: list[str]
    open_image: Callable[[int], Image.Image]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, index: Sequence[int], pre: Preprocessing, strict: bool = False) -> ImageSet:
        """Resized uint8 pixels of the chosen images; unreadable ones are skipped (counted), or an error if strict."""
        pixels, kept = [], []
        for i in index:
            try:
                with self.open_image(i) as image:
                    pixels.append(pre.resize_image(image))
                kept.append(self.labels[i])
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
                if strict:
                    raise FpetError(f"cannot read image {self.names[i]}: {exc}") from None
                log.warning("skipping unreadable image %s (%s)", self.names[i], exc)
        if not kept:
            raise FpetError(f"none of the {len(index)} images could be read (first: {self.names[index[0]]})")
        labels = torch.tensor(kept, dtype=torch.long)
        return ImageSet(torch.from_numpy(np.stack(pixels)), labels, self.classes, len(index) - len(kept))


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.exists():
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
                raise FpetError(f"{path} is damaged: {exc}") from None
            break
    else:
        raise FpetError(f"{folder} lacks {stem}(.gz): not a Fashion-MNIST folder")
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise FpetError(f"{stem} is not an IDX file of unsigned bytes")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8)
    if len(raw) < 4 + 4 * ndim or data.size != math.prod(shape):
        raise FpetError(f"{stem} is truncated: expected {math.prod(shape)} values, found {data.size}")
    return data.reshape(shape)


def _fashion_mnist(folder: Path, split: str) -> Source:
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    images, labels = _read_idx(folder, images_stem), _read_idx(folder, labels_stem)
    if len(images) != len(labels):
        raise FpetError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    return Source(
        labels.astype(int).tolist(),
        list(FASHION_MNIST_CLASSES),
        lambda i: Image.fromarray(images[i], mode="L"),
        [f"{images_stem}[{i}]" for i in range(len(images))],
    )


def _files(paths: list[Path], labels: list[int], classes: list[str]) -> Source:
    return Source(labels, classes, lambda i: Image.open(paths[i]), [str(p) for p in paths])


def _image_folder(root: Path, classes: list[str] | None) -> Source:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise FpetError(f"{root} has no class folders (expected one folder of images per class)")
    names = [d.name for d in class_dirs]
    if classes is not None and names != classes:
        raise FpetError(f"{root} has classes {names}, the training set {classes}")
    paths, labels = [], []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FpetError(f"class folder {folder} has no images")
        paths += files
        labels += [label] * len(files)
    return _files(paths, labels, names)


def _vtab_list(root: Path, listing: Path, num_classes: int | None) -> Source:
    paths, labels = [], []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?[0-9]{1,9}", parts[1]):
            raise FpetError(f"{listing}:{n}: expected 'relative/path label', got {line!r}")
        paths.append(root / parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise FpetError(f"{listing} lists no images")
    if num_classes is None and max(labels) >= len(labels):  # labels are 0..C-1: a class per image at most
        raise FpetError(f"{listing}: label {max(labels)} is larger than the {len(labels)} images listed allow")
    top = num_classes if num_classes is not None else max(labels) + 1
    bad = [lab for lab in labels if not 0 <= lab < top]
    if bad:
        raise FpetError(f"{listing}: label {bad[0]} is out of range 0..{top - 1}")
    return _files(paths, labels, [str(i) for i in range(top)])


def detect_format(root: Path) -> str:
    if (root / "train800val200.txt").exists() or (root / "test.txt").exists():
        return "vtab"
    if any((root / f"{FASHION_MNIST_FILES['train'][0]}{s}").exists() for s in ("", ".gz")):
        return "fashion-mnist"
    return "folder"


LabelGroups = list[tuple[str, list[str]]]


def parse_label_group(text: str) -> tuple[str, list[str]]:
    """`NAME=CLASS,CLASS,...`: a class of a new task made of classes of the dataset."""
    name, sep, members = text.partition("=")
    parts = [m.strip() for m in members.split(",") if m.strip()]
    if not sep or not name.strip() or not parts:
        raise FpetError(f"a label group is NAME=CLASS[,CLASS...], got {text!r}")
    return name.strip(), parts


def label_groups(config: dict) -> LabelGroups:
    """A run's label groups, from its config (none for runs on the data's own classes)."""
    return [(name, list(members)) for name, members in config.get("train", {}).get("label_groups") or ()]


def regroup(source: Source, groups: LabelGroups) -> Source:
    """The same images under a new label set: each group is a new class made of the dataset's classes, and images
    of classes in no group are left out. One dataset thus gives several tasks (e.g. coarse categories)."""
    names = [name for name, _ in groups]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise FpetError(f"label group {twice[0]!r} is given twice: each group is one class, join its members")
    target = {}
    for label, (name, members) in enumerate(groups):
        for member in members:
            if member not in source.classes:
                raise FpetError(f"label group {name!r} names {member!r}, not a class of the data: {source.classes}")
            if member in target:
                raise FpetError(f"class {member!r} is in two label groups")
            target[member] = label
    keep = [i for i, label in enumerate(source.labels) if source.classes[label] in target]
    return Source(
        [target[source.classes[source.labels[i]]] for i in keep],
        [name for name, _ in groups],
        lambda j: source.open_image(keep[j]),
        [source.names[i] for i in keep],
    )


def open_split(
    root: str | Path,
    split: str,
    *,
    fmt: str = "auto",
    classes: list[str] | None = None,
    groups: LabelGroups | None = None,
) -> Source | None:
    """The `train` pool or the `test` split of a dataset (relabelled by `groups` when given); None when the dataset
    has no such split."""
    source = _open_split(root, split, fmt, None if groups else classes)
    if source is None or not groups:
        return source
    source = regroup(source, groups)
    if classes is not None and source.classes != classes:
        raise FpetError(f"the label groups give classes {source.classes}, expected {classes}")
    return source


def _open_split(root: str | Path, split: str, fmt: str, classes: list[str] | None) -> Source | None:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FpetError(f"data folder {root} does not exist")
    if not any(root.iterdir()):
        raise FpetError(f"data folder {root} is empty")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "fashion-mnist":
        return _fashion_mnist(root, split)
    if fmt == "vtab":
        listing = root / ("train800val200.txt" if split == "train" else "test.txt")
        if not listing.exists():
            if split == "train":
                raise FpetError(f"{root} has no {listing.name}: not a VTAB folder")
            return None
        return _vtab_list(root, listing, None if classes is None else len(classes))
    if fmt == "folder":
        folder = root / split if (root / split).is_dir() else (root if split == "train" else None)
        return None if folder is None else _image_folder(folder, classes)
    raise FpetError(f"unknown data format {fmt!r}; choose auto, folder, vtab or fashion-mnist")


def split_train_val(n: int, train_size: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded VTAB-1k-style subset: `train_size` to train on (0: the rest), `val_size` to select with."""
    want = (train_size or n - val_size) + val_size
    if want > n:
        raise FpetError(f"asked for {train_size} train + {val_size} val images, the data has only {n}")
    if want == val_size:
        raise FpetError(f"--val-size {val_size} takes all {n} images: none are left to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: want - val_size].tolist(), order[want - val_size : want].tolist()
