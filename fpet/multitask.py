"""Many tasks on one backbone: the trained tensors of several runs stacked into banks, from which each image takes
its own task's through a gather and batched products (the reference form of multi-LoRA servers' BGMV kernels). One
batch can then mix tasks while the frozen backbone's products run once for all of them, and each extra task costs
its adapters only.

Tasks must share the backbone weights, image size, merge schedule, PET method and adapter width; the scale of each
task's adapters is folded into its up-projection, and heads of fewer classes are padded with zero columns (the
caller reads only the first `num_classes` logits of a task).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fpet.errors import FpetError
from fpet.pet import Bottleneck
from fpet.vit import VisionTransformer

METHODS = ("adaptformer", "adaptformer-1bit", "linear")  # LoRA is folded into qkv: it would not share a backbone


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False)


class AdapterBank(nn.Module):
    """T bottleneck adapters; image b uses adapter task[b]: relu(x W_down[t]) W_up[t]."""

    def __init__(self, adapters: Sequence[Bottleneck]):
        super().__init__()
        self.down = _frozen(torch.stack([a.down.weight.t() for a in adapters]))  # [T, dim, width]
        self.up = _frozen(torch.stack([a.up.weight.t() * a.scale for a in adapters]))  # [T, width, dim]

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        return torch.relu(x @ self.down[task]) @ self.up[task]


class HeadBank(nn.Module):
    """T linear heads padded to the widest: [B, dim] -> [B, most classes]."""

    def __init__(self, heads: Sequence[nn.Linear]):
        super().__init__()
        classes = max(h.out_features for h in heads)
        weight = torch.zeros(len(heads), heads[0].in_features, classes)
        bias = torch.zeros(len(heads), classes)
        for t, head in enumerate(heads):
            weight[t, :, : head.out_features] = head.weight.detach().t()
            bias[t, : head.out_features] = head.bias.detach()
        self.weight, self.bias = _frozen(weight), _frozen(bias)

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        return (x[:, None] @ self.weight[task])[:, 0] + self.bias[task]


def frozen_tensors(model: VisionTransformer) -> dict[str, Tensor]:
    """What the tasks must share: every tensor outside the adapters, the merge refinements and the head."""
    trained = ("adapter", "refine", "head")
    return {k: v for k, v in model.state_dict().items() if not any(part in k.split(".") for part in trained)}


def stack_tasks(models: Sequence[VisionTransformer]) -> VisionTransformer:
    """One multi-task model from deployed single-task models (`freeze_for_deployment`) of the same backbone; call
    it with `model(x, task)`, task an int64 [B] index into `models`."""
    if not models:
        raise FpetError("no tasks to stack")
    first = models[0]
    if first.pet.method not in METHODS:
        raise FpetError(f"multi-task models take {', '.join(METHODS)} runs, not {first.pet.method}")
    shared = frozen_tensors(first)
    for i, model in enumerate(models[1:], 1):
        other = frozen_tensors(model)
        differ = [k for k in shared if k not in other or not torch.equal(shared[k], other[k])]
        if differ or other.keys() != shared.keys() or model.schedule != first.schedule:
            raise FpetError(
                f"task {i} does not share task 0's backbone and schedule (first difference: "
                f"{(differ or ['schedule'])[0]})"
            )
    stacked = copy.deepcopy(first)
    for i, block in enumerate(stacked.blocks):
        if block.adapter is not None:
            block.adapter = AdapterBank([m.blocks[i].adapter for m in models])
        if block.merger is not None and block.merger.refine is not None:
            block.merger.refine = AdapterBank([m.blocks[i].merger.refine for m in models])
    stacked.head = HeadBank([m.head for m in models])
    stacked.num_classes = stacked.head.weight.shape[-1]
    return stacked.eval()
