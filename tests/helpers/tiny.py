"""Tiny models, datasets and runs the tests build themselves: ViT configurations, colour-coded image folders, trained
runs and random backbones."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from fpet.config import ViTConfig
from fpet.pet import PetConfig
from fpet.vit import create_model
from fpet.weights import load_backbone
from training import checkpoint
from training.config import TrainConfig
from training.data import Preprocessing
from training.loop import _run_config

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


def make_image_folder(root: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """Three colour-coded classes with noise: learnable in a few steps by any model."""
    rng = np.random.default_rng(seed)
    for label, colour in enumerate(COLOURS):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data),
        out=str(out),
        weights="random",
        backbone="vit_tiny_patch16_224",
        method="adaptformer",
        schedule="6:0.5",
        img_size=32,
        train_size=24,
        val_size=12,
        test=False,
        epochs=3,
        warmup_epochs=1,
        batch_size=8,
        lr=3e-3,
        eval_every=1,
        device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def make_run(path, method="adaptformer", schedule="6:0.5", img_size=64, seed=0, labels=("a", "b", "c"), weights=None):
    """A run folder with random (non-zero) trained tensors, as `fpet train` writes it, without the training. The
    backbone is random from `seed`, or read from a `weights` file (tasks of one backbone, see `make_backbone`)."""
    cfg = TrainConfig(
        data="",
        out=str(path),
        weights=str(weights or "random"),
        backbone="vit_tiny_patch16_224",
        method=method,
        schedule=schedule,
        img_size=img_size,
        seed=seed,
    )
    tensors, digest = checkpoint.read_weights(weights and Path(weights))
    config = _run_config(cfg, "vit_tiny_patch16_224", digest, PetConfig(method), Preprocessing(img_size), list(labels))
    model = checkpoint.build_model(config)
    if tensors is not None:
        load_backbone(model, tensors)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    checkpoint.write_run(path, model, config, {"val": {"last": 0.5}})
    return path


def make_backbone(path: Path, img_size: int = 64, seed: int = 0) -> Path:
    """A random ViT-Ti backbone saved as a weights file, for runs that must share one."""
    torch.manual_seed(seed)
    model = create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


TINY = ViTConfig("vit_test_tiny", patch_size=4, embed_dim=32, depth=4, num_heads=2, img_size=32)
TINY_LS = ViTConfig("vit_test_tiny_ls", patch_size=4, embed_dim=32, depth=4, num_heads=2, img_size=32, layer_scale=True)


TASKS = {"shapes": ("a", "b", "c"), "colours": ("x", "y"), "sizes": ("p", "q", "r", "s", "t")}
