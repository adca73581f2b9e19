"""A Vision Transformer with timm's state-dict layout, PET modules and token merging inside its blocks.

Attention calls scaled_dot_product_attention (fused kernels on GPUs and CPUs), with proportional attention's
log-size bias as an additive float mask; `Attention.fused = False` writes it out as softmax(QK^T * scale + bias) V,
the same maths, for exporters or runtimes that want the plain form.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpet import merge
from fpet.config import ViTConfig, get_config, grid_size
from fpet.pet import Bottleneck, LoRA, PetConfig, mark_trainable, materialize_binary, per_task
from fpet.schedule import MergeSchedule, MergeStep, parse_schedule, plan
from fpet.trr import TokenMerger


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch per sample with probability p, rescaling the survivors."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def fold_into(self, linear: nn.Linear) -> None:
        """Scale the linear layer that feeds this one instead (exact: both are linear), saving a multiply per
        token at deployment; the caller then drops this module."""
        with torch.no_grad():
            linear.weight.mul_(self.gamma[:, None])
            if linear.bias is not None:
                linear.bias.mul_(self.gamma)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, lora: LoRA | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.lora = lora
        self.fused = True
        self.key_mean: nn.Linear | None = None  # deployment only: see fold_key_mean

    def forward(self, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the output and the qkv projection [B, N, 3C], from which a merge takes its metric (`mean_keys`)."""
        b, n, c = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.lora is not None:
            dq, dv = self.lora(x)
            q = q + dq.reshape(b, n, self.num_heads, -1).transpose(1, 2)
            v = v + dv.reshape(b, n, self.num_heads, -1).transpose(1, 2)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), qkv

    def mean_keys(self, x: Tensor, qkv: Tensor) -> Tensor:
        """The merge metric: the keys averaged over heads [B, N, head_dim] (LoRA leaves the keys alone); `x` is this
        attention's input and `qkv` its projection."""
        if self.key_mean is not None:
            return self.key_mean(x)
        b, n, c3 = qkv.shape
        c = c3 // 3
        return qkv[..., c : 2 * c].reshape(b, n, self.num_heads, c // self.num_heads).mean(dim=2)

    def fold_key_mean(self) -> None:
        """Deployment: the head-averaged keys as one small linear layer of their own (the mean of the heads' key
        weights), exact since both are linear. The matching after it runs in fp32, and a runtime that keeps it
        there (see fpet.merge) widens everything back to the nearest matrix product: reading the keys out of the
        attention's q/k/v split would widen that whole split, and reorder the full projection, in every batch."""
        dim = self.proj.in_features
        head_dim = dim // self.num_heads
        weight = self.qkv.weight[dim : 2 * dim].reshape(self.num_heads, head_dim, dim).mean(dim=0)
        self.key_mean = nn.Linear(dim, head_dim, bias=self.qkv.bias is not None).to(weight)
        with torch.no_grad():
            self.key_mean.weight.copy_(weight)
            if self.qkv.bias is not None:
                self.key_mean.bias.copy_(self.qkv.bias[dim : 2 * dim].reshape(self.num_heads, head_dim).mean(dim=0))

    def fold_lora(self) -> None:
        """Fold the LoRA updates into the frozen qkv weight (exact: LoRA is linear), then drop the LoRA module."""
        if self.lora is None:
            return
        dq, dv = self.lora.delta_weights()
        dim = self.proj.in_features
        with torch.no_grad():
            self.qkv.weight[:dim] += dq
            self.qkv.weight[2 * dim :] += dv
        self.lora = None


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, pet: PetConfig, merger: TokenMerger | None, drop_path_rate: float):
        super().__init__()
        dim = cfg.embed_dim
        lora = None
        if pet.base == "lora":
            lora = LoRA(dim, pet.bottleneck, scale=pet.scale, dropout=pet.dropout, binary=pet.binary)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, lora)
        self.ls1 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.merger = merger
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_dim)
        self.ls2 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.adapter = None
        if pet.base == "adaptformer":
            self.adapter = Bottleneck(dim, pet.bottleneck, scale=pet.scale, dropout=pet.dropout, binary=pet.binary)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        x: Tensor,
        size: Tensor | None,
        bias: Tensor | None,
        step: MergeStep | None,
        groups: Tensor | None = None,
        task: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """`size` and `bias` (None before the first merge): the tokens' sizes and their log as the attention's
        proportional bias; `groups` (merge maps only): the token each original patch is in, carried through the
        merge; `task` (multi-task models only): each image's task, choosing its adapters from the banks."""
        normed = self.norm1(x)
        attn, qkv = self.attn(normed, bias)
        x = x + drop_path(self.ls1(attn), self.drop_path_rate, self.training)
        if step is not None:
            assert self.merger is not None
            x, size, groups = self.merger(x, size, self.attn.mean_keys(normed, qkv), step, groups, task)
        out = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)
        if self.adapter is not None:
            # AdaptFormer: parallel to the MLP, fed the un-normalised residual
            out = out + per_task(self.adapter, x, task)
        return out, size, groups


class VisionTransformer(nn.Module):
    """ViT classifier; `forward_features` gives the final normalised tokens (cls first, fewer after merges)."""

    def __init__(
        self,
        cfg: ViTConfig,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] | None = None,
        pet: PetConfig | None = None,
        schedule: MergeSchedule | str | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.cfg = cfg
        self.pet = pet or PetConfig("full")
        self.schedule = parse_schedule(schedule)
        self.img_size = img_size or cfg.img_size
        self.grid = grid_size(self.img_size, cfg.patch_size)
        self.num_classes = num_classes
        points = self.schedule.per_block(cfg.depth)
        plan(self.schedule, cfg.depth, self.grid)  # validate the schedule against this model now
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        rates = [drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(cfg, self.pet, TokenMerger(p.method, cfg.head_dim, self.pet.dropout) if p else None, rate)
            for p, rate in zip(points, rates, strict=True)
        )
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        mark_trainable(self, self.pet.method)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not any(part in name for part in ("adapter", "lora", "refine")):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_deploy(self, deploy: bool = True) -> VisionTransformer:
        """Deployment mode: merges compute the hard assignment only (no soft path); same outputs in eval."""
        for block in self.blocks:
            if block.merger is not None:
                block.merger.deploy = deploy
        return self

    def set_fused_attention(self, fused: bool = True) -> VisionTransformer:
        for block in self.blocks:
            block.attn.fused = fused
        return self

    def fold_lora(self) -> VisionTransformer:
        for block in self.blocks:
            block.attn.fold_lora()
        return self

    def fold_layer_scale(self) -> VisionTransformer:
        for block in self.blocks:
            if isinstance(block.ls1, LayerScale):
                block.ls1.fold_into(block.attn.proj)
                block.ls2.fold_into(block.mlp.fc2)
                block.ls1, block.ls2 = nn.Identity(), nn.Identity()
        return self

    def freeze_for_deployment(self) -> VisionTransformer:
        """One-way: LoRA folded into qkv, LayerScale into the layers before it, 1-bit weights materialised, the merge
        metric a linear layer of its own, hard merges only, eval mode, no gradients."""
        self.fold_lora()
        for block in self.blocks:
            if block.merger is not None:
                block.attn.fold_key_mean()
        self.fold_layer_scale()
        materialize_binary(self)
        self.requires_grad_(False)
        return self.set_deploy(True).eval()

    def merge_plan(self, grid: tuple[int, int] | None = None) -> tuple[MergeStep | None, ...]:
        return _cached_plan(self.schedule, self.cfg.depth, grid or self.grid)

    @property
    def merges(self) -> bool:
        return any(step is not None for step in self.merge_plan())

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        if grid == self.grid:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, self.grid, grid)

    def forward_features(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        return self._features(x, explain=False, task=task)[0]

    def _features(self, x: Tensor, explain: bool, task: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Final normalised tokens and, with `explain`, the patch-to-token map [B, patches] after each merge point."""
        # Python ints, also under tracing: the merge plan and its index sets are static for a given input size.
        grid = grid_size((int(x.shape[-2]), int(x.shape[-1])), self.cfg.patch_size)
        batch = x.shape[0]  # the images' own: a shape read off the tokens would tie them to the shape's precision
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + self._pos_embed(grid)
        groups = merge.initial_groups(batch, x.shape[1] - 1, x.device) if explain else None
        size = bias = None
        maps = []
        for block, step in zip(self.blocks, self.merge_plan(grid), strict=True):
            x, size, groups = block(x, size, bias, step, groups, task)
            if step is not None:  # the size bias, once per merge point for all the blocks after it
                bias = merge.size_bias(size, x.dtype)
                if groups is not None:
                    maps.append(groups)
        return self.norm(x), maps

    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """`task` (multi-task models, `fpet.multitask`): each image's task index [B]."""
        return per_task(self.head, self.forward_features(x, task)[:, 0], task)

    def forward_explained(self, x: Tensor, task: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits and merge maps: [B, merge points, patches], the token each patch is in after each merge point
        (from the same hard assignments as the logits; no merge points: [B, 0, patches])."""
        tokens, groups = self._features(x, explain=True, task=task)
        logits = per_task(self.head, tokens[:, 0], task)
        if not groups:
            patches = tokens.shape[1] - 1  # nothing merged
            return logits, torch.zeros(x.shape[0], 0, patches, dtype=torch.long, device=x.device)
        return logits, torch.stack(groups, dim=1)


@functools.lru_cache(maxsize=32)
def _cached_plan(schedule: MergeSchedule, depth: int, grid: tuple[int, int]) -> tuple[MergeStep | None, ...]:
    return tuple(plan(schedule, depth, grid))


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resampling of the patch position grid (cls position kept), as DINOv2 and timm do."""
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid_pos = grid_pos.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid_pos = grid_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, grid_pos], dim=1)


def create_model(
    backbone: str | ViTConfig,
    *,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] | None = None,
    method: str | PetConfig = "full",
    schedule: MergeSchedule | str | None = None,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """Build a model by backbone name (see `fpet.config.CONFIGS`), PET method and merge schedule."""
    cfg = backbone if isinstance(backbone, ViTConfig) else get_config(backbone)
    pet = method if isinstance(method, PetConfig) else PetConfig(method)
    return VisionTransformer(cfg, num_classes, img_size, pet, schedule, drop_path_rate)
