"""The table of ViT shapes this library builds, named as timm names them so timm checkpoints map one to one."""

from __future__ import annotations

from dataclasses import dataclass

from fpet.errors import FpetError


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a plain ViT. `img_size` is the size its position grid was trained at."""

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    img_size: int = 224
    layer_scale: bool = False
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


CONFIGS: dict[str, ViTConfig] = {
    c.name: c
    for c in (
        ViTConfig("vit_tiny_patch16_224", patch_size=16, embed_dim=192, depth=12, num_heads=3),
        ViTConfig("vit_small_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=6),
        # ImageNet-21k layout (augreg / the FPET paper's backbone): no pre-logits layer, a plain head.
        ViTConfig("vit_base_patch16_224", patch_size=16, embed_dim=768, depth=12, num_heads=12),
        ViTConfig("vit_large_patch16_224", patch_size=16, embed_dim=1024, depth=24, num_heads=16),
        # DINOv2: 37x37 position grid (518 px), layer scale; the grid is resampled to the input size.
        ViTConfig(
            "vit_small_patch14_dinov2",
            patch_size=14,
            embed_dim=384,
            depth=12,
            num_heads=6,
            img_size=518,
            layer_scale=True,
        ),
        ViTConfig(
            "vit_base_patch14_dinov2",
            patch_size=14,
            embed_dim=768,
            depth=12,
            num_heads=12,
            img_size=518,
            layer_scale=True,
        ),
    )
}


def get_config(name: str) -> ViTConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise FpetError(f"unknown backbone {name!r}; choose one of: {', '.join(CONFIGS)}") from None


def grid_size(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) for an input size; refuses sizes the patches do not tile exactly."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise FpetError(f"image size {h}x{w} is not a positive multiple of the patch size {patch_size}")
    return h // patch_size, w // patch_size
