"""Training settings, with the FPET paper's defaults (VTAB-1k protocol); every one is a CLI flag."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    weights: str = "dinov2_vits14"  # a registry name, a weights file, or "random"
    backbone: str | None = None  # architecture; default: the registry entry's
    method: str = "adaptformer"
    schedule: str = "6:0.5"
    width: int | None = None
    scale: float = 1.0
    img_size: int = 224
    normalize: str = "none"
    data_format: str = "auto"
    label_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # new classes made of the data's (NAME=A,B)
    train_size: int = 800
    val_size: int = 200
    test: bool = True
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    head_init: str = "random"  # "probe": the head starts as a linear probe of the frozen features (LP-FT)
    init_from: str | None = None  # a run folder whose trained tensors (adapters, head) this run starts from
    teacher: str | None = None  # a run folder whose softened predictions the loss also follows
    distill_weight: float = 1.0  # weight of the distillation term added to the cross-entropy
    distill_temperature: float = 2.0
    drop_path: float = 0.1
    seed: int = 0
    eval_every: int = 10
    eval_batch_size: int = 256
    device: str = "auto"
    strict: bool = False
    resume: bool = False

    def to_dict(self) -> dict:
        return asdict(self)
