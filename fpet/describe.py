"""What a model configuration costs: tokens per block, analytic GMACs, parameter counts."""

from __future__ import annotations

import torch

from fpet.config import get_config, grid_size
from fpet.cost import model_macs
from fpet.pet import PetConfig
from fpet.schedule import MergeSchedule, parse_schedule, plan, tokens_per_block
from fpet.vit import VisionTransformer


def describe(
    backbone: str,
    *,
    method: str | PetConfig = "adaptformer",
    schedule: str | MergeSchedule | None = None,
    img_size: int | None = None,
    num_classes: int = 1000,
) -> dict:
    """A JSON-ready summary. The model is built on the meta device: shapes only, no memory, no init cost."""
    cfg = get_config(backbone)
    pet = method if isinstance(method, PetConfig) else PetConfig(method)
    sched = parse_schedule(schedule)
    size = img_size or cfg.img_size
    grid = grid_size(size, cfg.patch_size)
    steps = plan(sched, cfg.depth, grid)
    baseline = plan(MergeSchedule(), cfg.depth, grid)
    with torch.device("meta"):
        model = VisionTransformer(cfg, num_classes, size, pet, sched)
    macs = model_macs(cfg, grid, steps, pet, num_classes)
    macs_plain = model_macs(cfg, grid, baseline, pet, num_classes)
    return {
        "backbone": cfg.name,
        "img_size": size,
        "method": pet.method,
        "schedule": sched.spec,
        "merges": [
            {"block": s.block, "method": s.method, "split": s.split, "tokens_in": s.tokens_in, "merged": s.merged}
            for s in steps
            if s is not None
        ],
        "tokens_per_block": tokens_per_block(steps, grid),
        "gmacs": round(macs / 1e9, 4),
        "gmacs_without_merging": round(macs_plain / 1e9, 4),
        "ideal_speedup": round(macs_plain / macs, 4),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "num_classes": num_classes,
    }
