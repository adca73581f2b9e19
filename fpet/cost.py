"""Analytic cost: multiply-accumulates per image, counted from the layer shapes and the merge plan.

Every matrix product the model runs is counted (patch embedding, attention, MLP, PET modules, the merge's
refinement adapter, its similarity (elementwise in exported graphs, fpet.merge) and its product of the sources into
B, the head); element-wise work (norms, softmax, GELU, sizes) is not, as in the papers' GFLOPs. The test suite checks
these counts against torch's FLOP counter on the real modules.
"""

from __future__ import annotations

from fpet.config import ViTConfig
from fpet.pet import PetConfig
from fpet.schedule import MergeStep
from fpet.trr import REFINE_WIDTH


def attention_macs(cfg: ViTConfig, n: int, pet: PetConfig) -> int:
    d = cfg.embed_dim
    macs = 4 * n * d * d + 2 * n * n * d  # qkv + proj, QK^T + AV
    if pet.base == "lora":
        macs += 4 * n * d * pet.bottleneck  # q and v, each down then up
    return macs


def mlp_macs(cfg: ViTConfig, n: int, pet: PetConfig) -> int:
    macs = 2 * n * cfg.embed_dim * cfg.mlp_dim
    if pet.base == "adaptformer":
        macs += 2 * n * cfg.embed_dim * pet.bottleneck
    return macs


def merge_macs(cfg: ViTConfig, step: MergeStep) -> int:
    macs = step.n_a * step.n_b * cfg.head_dim  # cosine similarity of A against B
    if step.method == "fpet":
        macs += 2 * step.tokens_in * cfg.head_dim * REFINE_WIDTH  # key refinement adapter
    return macs + step.merged * step.n_b * cfg.embed_dim  # the weighted sources into B


def model_macs(
    cfg: ViTConfig, grid: tuple[int, int], steps: list[MergeStep | None], pet: PetConfig, num_classes: int
) -> int:
    """Multiply-accumulates for one image."""
    tokens = grid[0] * grid[1] + 1
    macs = (tokens - 1) * cfg.embed_dim * 3 * cfg.patch_size**2
    for step in steps:
        macs += attention_macs(cfg, tokens, pet)
        if step is not None:
            macs += merge_macs(cfg, step)
            tokens = step.tokens_out
        macs += mlp_macs(cfg, tokens, pet)
    return macs + cfg.embed_dim * num_classes
