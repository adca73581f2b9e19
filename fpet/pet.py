"""Parameter-efficient tuning modules (AdaptFormer, LoRA, their 1-bit forms) and what each method trains."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fpet.errors import FpetError

METHODS = ("linear", "full", "adaptformer", "lora", "adaptformer-1bit", "lora-1bit")
DEFAULT_WIDTH = {"adaptformer": 8, "lora": 8, "adaptformer-1bit": 32, "lora-1bit": 32}
ONE_BIT_CODE = math.sqrt(2.0 / math.pi)  # E|z| for z ~ N(0, 1): the 1-bit code that best fits a unit normal


@dataclass(frozen=True)
class PetConfig:
    """`width`: adapter bottleneck or LoRA rank (None: the method's default); `scale`: the residual scale s."""

    method: str = "adaptformer"
    width: int | None = None
    scale: float = 1.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FpetError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.width is not None and self.width < 1:
            raise FpetError(f"adapter width must be at least 1, got {self.width}")

    @property
    def binary(self) -> bool:
        return self.method.endswith("-1bit")

    @property
    def base(self) -> str:
        return self.method.removesuffix("-1bit")

    @property
    def bottleneck(self) -> int:
        return self.width or DEFAULT_WIDTH.get(self.method, 0)


def binarize(w: Tensor) -> Tensor:
    """Fake 1-bit quantisation: standardise by the tensor's own mean/std, snap to +-sqrt(2/pi), scale back.

    The straight-through estimator passes the gradient to the latent float weights unchanged.
    """
    latent = w.detach()
    mean, std = latent.mean(), latent.std().clamp_min(1e-12)
    q = torch.where(latent >= mean, ONE_BIT_CODE, -ONE_BIT_CODE).to(w.dtype) * std + mean
    return q + (w - latent)  # exactly q in the forward pass, identity gradient to w


class BinaryLinear(nn.Linear):
    """A linear layer whose weight is 1-bit in every forward pass (two distinct values per tensor)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, binarize(self.weight), self.bias)


def materialize_binary(model: nn.Module) -> None:
    """Replace every BinaryLinear by a plain Linear holding its two-valued weight: the deployment form."""
    for name, child in model.named_children():
        if isinstance(child, BinaryLinear):
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(binarize(child.weight))
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            setattr(model, name, plain.to(child.weight.device))
        else:
            materialize_binary(child)


def _linear(d_in: int, d_out: int, binary: bool) -> nn.Linear:
    return (BinaryLinear if binary else nn.Linear)(d_in, d_out, bias=False)


def _init_up(layer: nn.Linear, binary: bool) -> None:
    # Zero makes a fresh adapter the identity; a 1-bit tensor cannot be all zero, so it starts tiny instead.
    if binary:
        nn.init.trunc_normal_(layer.weight, std=1e-3)
    else:
        nn.init.zeros_(layer.weight)


class Bottleneck(nn.Module):
    """scale * up(dropout(relu(down(x)))): AdaptFormer's adapter, and FPET's key-refinement adapter."""

    def __init__(self, dim: int, width: int, *, scale: float = 1.0, dropout: float = 0.1, binary: bool = False):
        super().__init__()
        self.down = _linear(dim, width, binary)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = _linear(width, dim, binary)
        self.scale = scale
        _init_up(self.up, binary)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale


class LoRA(nn.Module):
    """Low-rank updates of the query and value projections (not the key), as in the FPET paper."""

    def __init__(self, dim: int, rank: int, *, scale: float = 1.0, dropout: float = 0.1, binary: bool = False):
        super().__init__()
        self.q_down, self.q_up = _linear(dim, rank, binary), _linear(rank, dim, binary)
        self.v_down, self.v_up = _linear(dim, rank, binary), _linear(rank, dim, binary)
        self.drop = nn.Dropout(dropout)
        self.scale = scale
        _init_up(self.q_up, binary)
        _init_up(self.v_up, binary)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.drop(x)
        return self.q_up(self.q_down(x)) * self.scale, self.v_up(self.v_down(x)) * self.scale

    def delta_weights(self) -> tuple[Tensor, Tensor]:
        """The effective q and v weight updates (as nn.Linear weights), for folding into qkv at export."""

        def weight(layer: nn.Linear) -> Tensor:
            return binarize(layer.weight) if isinstance(layer, BinaryLinear) else layer.weight

        q = weight(self.q_up) @ weight(self.q_down) * self.scale
        v = weight(self.v_up) @ weight(self.v_down) * self.scale
        return q, v


def per_task(module: nn.Module, x: Tensor, task: Tensor | None) -> Tensor:
    """A module of a single-task model takes `x`; a bank of a multi-task model (`fpet.multitask`) also takes each
    image's task."""
    return module(x) if task is None else module(x, task)


PET_MODULE = {"linear": None, "adaptformer": "adapter", "lora": "lora"}


def is_trainable(name: str, method: str) -> bool:
    """Whether a parameter trains under `method`: the PET modules, the merge refinement adapters and the head."""
    if method == "full":
        return True
    parts = name.split(".")
    return parts[0] == "head" or "merger" in parts or PET_MODULE[method.removesuffix("-1bit")] in parts


def mark_trainable(model: nn.Module, method: str) -> None:
    """Freeze everything the method does not train."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, method))


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the tensors that were trained: what a PET checkpoint stores (kilobytes, not the backbone)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load a trainable-only state dict, refusing missing, unexpected or misshapen tensors."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise FpetError(
            f"checkpoint does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise FpetError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
