"""Re-evaluating a finished run on any split of a dataset, to reproduce (or extend) its reported accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from fpet.errors import FpetError
from training.checkpoint import load_run
from training.data import Preprocessing, label_groups, open_split, split_train_val
from training.loop import evaluate, pick_device


def evaluate_run(
    run_dir: str | Path,
    data: str,
    *,
    split: str = "test",
    data_format: str = "auto",
    batch_size: int = 256,
    device: str = "auto",
    weights: str | None = None,
    per_image: bool = False,
) -> dict:
    model, config = load_run(run_dir, weights)
    pre = Preprocessing.from_dict(config["preprocessing"])
    train = config["train"]
    if split not in ("train", "val", "test"):
        raise FpetError(f"unknown split {split!r}; choose train, val or test")
    source = open_split(
        data,
        "test" if split == "test" else "train",
        fmt=data_format,
        classes=config["labels"],
        groups=label_groups(config),
    )
    if source is None:
        raise FpetError(f"{data} has no {split} split")
    if source.classes != config["labels"]:
        raise FpetError(f"{data} has classes {source.classes[:5]}..., the run {config['labels'][:5]}...")
    index: list[int] | range = range(len(source))
    if split != "test":
        train_idx, val_idx = split_train_val(len(source), train["train_size"], train["val_size"], train["seed"])
        index = train_idx if split == "train" else val_idx
        if not index:
            raise FpetError(f"{run_dir} was trained with no {split} images (--val-size 0): choose another split")
    subset = source.decode(index, pre)
    target = pick_device(device, 0)
    torch.manual_seed(0)
    return {"split": split, **evaluate(model.to(target), subset, pre, batch_size, target, per_image)}
