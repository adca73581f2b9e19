"""`fpet train` and `fpet evaluate`: the training stage's flags, with TrainConfig's defaults."""

from __future__ import annotations

import argparse
import json


def label_group(text: str) -> tuple[str, list[str]]:
    from fpet.errors import FpetError
    from training.data import parse_label_group

    try:
        return parse_label_group(text)
    except FpetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_train(args: argparse.Namespace) -> None:
    import logging

    from training.config import TrainConfig
    from training.loop import train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["label_groups"] = tuple((name, tuple(members)) for name, members in args.label_groups or ())
    metrics = train(TrainConfig(**fields), log=lambda message: print(message, flush=True))
    if metrics:
        print(json.dumps(summary_of(metrics), indent=2))


def summary_of(metrics: dict) -> dict:
    """The figures a user looks for first; the full history is in metrics.json."""
    keys = ("eval_split", "val", "test", "train_images_per_s", "train_seconds", "peak_memory_mb", "memory_kind")
    return {k: metrics[k] for k in keys if k in metrics}


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_run

    result = evaluate_run(
        args.run,
        args.data,
        split=args.split,
        data_format=args.data_format,
        batch_size=args.batch_size,
        device=args.device,
        weights=args.weights,
    )
    print(json.dumps(result, indent=2))


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from training.config import TrainConfig

    d = TrainConfig(data="", out="")
    p = sub.add_parser(
        "train",
        help="tune a pretrained ViT on a labelled image set; writes a run folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help="image folder (one folder per class), VTAB-1k list folder, or Fashion-MNIST folder",
    )
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--data-format", default=d.data_format, choices=["auto", "folder", "vtab", "fashion-mnist"])
    p.add_argument(
        "--group",
        dest="label_groups",
        action="append",
        type=label_group,
        metavar="NAME=CLASS,CLASS",
        help="train on a new label set: a class NAME made of the data's classes (repeat; unlisted classes are left "
        "out), e.g. --group footwear=Sandal,Sneaker,'Ankle boot' --group bags=Bag",
    )
    p.add_argument(
        "--weights",
        default=d.weights,
        help="pretrained name (fpet weights list), a weights file, timm:NAME, or 'random'",
    )
    p.add_argument("--backbone", default=d.backbone, help="architecture; default: the pretrained weights' own")
    p.add_argument("--method", default=d.method, help="linear, full, adaptformer, lora, adaptformer-1bit, lora-1bit")
    p.add_argument("--schedule", default=d.schedule, help="merge schedule: none, 6:0.5, 3:0.5,6:0.5,9:0.5, tome:13")
    p.add_argument("--width", type=int, default=d.width, help="adapter width / LoRA rank (default: 8, 32 for 1-bit)")
    p.add_argument("--scale", type=float, default=d.scale, help="PET residual scale s")
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--normalize", default=d.normalize, choices=["none", "imagenet"], help="input normalisation")
    p.add_argument(
        "--train-size",
        type=int,
        default=d.train_size,
        help="training images drawn from the train pool (0: all but val)",
    )
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images drawn from the train pool")
    p.add_argument("--no-test", dest="test", action="store_false", help="skip the final test-split evaluation")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch (split across torchrun processes)"
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--head-init",
        default=d.head_init,
        choices=["random", "probe"],
        help="probe: fit the head on the frozen features first (LP-FT), so short runs start from a working classifier",
    )
    p.add_argument(
        "--init-from",
        metavar="RUN",
        default=d.init_from,
        help="start from a trained run's adapters and head (same backbone, method, width, labels and "
        "image size); only what it lacks, such as the merge's refinement adapter, starts fresh",
    )
    p.add_argument(
        "--teacher",
        metavar="RUN",
        default=d.teacher,
        help="distil from a trained run (same backbone, labels and image size), typically the same PET "
        "without merging: its logits on the training images are computed once",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=d.distill_weight,
        help="weight of the KL term between the teacher's and the model's softened predictions, added "
        "to the cross-entropy (0: plain cross-entropy)",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=d.distill_temperature,
        help="softmax temperature of both sides of the KL term",
    )
    p.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--drop-path", type=float, default=d.drop_path)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between evaluations")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="reload a run and measure its accuracy on a split")
    p.add_argument("run", help="run folder written by fpet train")
    p.add_argument("--data", required=True)
    p.add_argument("--data-format", default="auto", choices=["auto", "folder", "vtab", "fashion-mnist"])
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--weights", help="backbone weights, if not where the run was trained (checksum still checked)")
    p.set_defaults(func=cmd_evaluate)
