"""Starting from, and learning from, a trained run: warm starts (`--init-from`) and distillation (`--teacher`).

FPET's merge changes what the later blocks see, so a model that learns with merging from scratch ends a short
protocol behind the same PET without merging. Two remedies that cost little: start the adapters and the head where
an unmerged run left them (only the merge's refinement adapter is new), and let that run's soft predictions guide
the merged model. Both need the other run to share the backbone, the labels and the input, which is checked here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fpet.errors import FpetError
from fpet.vit import VisionTransformer
from training import checkpoint
from training.data import ImageSet, Preprocessing


def _backbone_identity(config: dict) -> tuple:
    """Random backbones are only the same when drawn from the same seed; pretrained ones when their tensors are."""
    backbone = config["backbone"]
    digest = backbone["tensors_sha256"]
    return (backbone["name"], digest) if digest else (backbone["name"], "random", config["seed"])


def check_compatible(other: dict, run: dict, flag: str, other_dir: str | Path, *, same_pet: bool) -> None:
    """Refuse a teacher or a source run that does not fit the run about to train, in one line that says why."""
    where = f"{flag} {other_dir}"
    if _backbone_identity(other) != _backbone_identity(run):
        name = other["backbone"]["name"]
        raise FpetError(f"{where} was trained on other backbone weights ({name}, {other['backbone']['weights']})")
    if other["labels"] != run["labels"]:
        raise FpetError(f"{where} has labels {other['labels'][:4]}..., this run {run['labels'][:4]}...")
    mine, theirs = run["preprocessing"], other["preprocessing"]
    for key, flag_name in (("img_size", "--img-size"), ("normalize", "--normalize")):
        if theirs[key] != mine[key]:
            raise FpetError(f"{where} was trained with {flag_name} {theirs[key]}, this run has {mine[key]}")
    if same_pet and other["pet"] != run["pet"]:
        raise FpetError(f"{where} has another PET ({other['pet']}); this run has {run['pet']}")


def warm_start(model: VisionTransformer, source_dir: str | Path, run_config: dict) -> list[str]:
    """Copy the source run's trained tensors into `model`; returns the names of those that start fresh (the merge
    refinement adapters of merge points the source did not have). Source tensors the model lacks are refused."""
    config = checkpoint.read_config(source_dir)
    check_compatible(config, run_config, "--init-from", source_dir, same_pet=True)
    tensors = checkpoint.read_adapters(source_dir)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    foreign = sorted(set(tensors) - set(params))
    if foreign:
        raise FpetError(f"--init-from {source_dir} holds tensors this run has no place for: {', '.join(foreign[:3])}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise FpetError(
                    f"--init-from {source_dir}: {name} has shape {tuple(value.shape)}, this run's is "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    return sorted(set(params) - set(tensors))


@torch.no_grad()
def teacher_logits(
    teacher_dir: str | Path,
    run_config: dict,
    data: ImageSet,
    pre: Preprocessing,
    device: torch.device,
    batch_size: int = 256,
) -> Tensor:
    """The teacher's logits for every training image, computed once: the images are not augmented, so every epoch
    would ask the same question. The teacher is freed afterwards."""
    config = checkpoint.read_config(teacher_dir)
    check_compatible(config, run_config, "--teacher", teacher_dir, same_pet=False)
    teacher, _ = checkpoint.load_run(teacher_dir)
    teacher.to(device).eval()
    logits = [
        teacher(pre.to_input(data.pixels[i : i + batch_size].to(device))).float()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(logits).cpu() if logits else torch.empty(0, len(run_config["labels"]))


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2 so its gradient keeps the
    cross-entropy's scale whatever the temperature (Hinton et al.)."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def training_loss(logits: Tensor, labels: Tensor, teacher: Tensor | None, weight: float, temperature: float) -> Tensor:
    """Cross-entropy, plus the weighted distillation term when there is a teacher (weight 0 adds exactly 0)."""
    loss = F.cross_entropy(logits, labels)
    if teacher is None:
        return loss
    return loss + weight * distill_loss(logits, teacher, temperature)
