"""`fpet schedule search`: the least merging that meets a speed or GMACs budget on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_schedule_search(args: argparse.Namespace) -> None:
    from bench.search import Budget, candidate_trainer, read_run, search, write_results
    from fpet.errors import FpetError

    budget = Budget(args.min_speedup, args.max_gmacs)
    backbone, img_size, method, classes, base = args.backbone, args.img_size, args.method, 10, {}
    if args.run:
        backbone, img_size, method, classes, base = read_run(Path(args.run))
    data = args.data or ("" if args.no_train else base.get("data"))
    if args.data and args.no_train:
        raise FpetError("--data trains candidates; --no-train times them only: give one")
    train = None
    if data:
        settings = {**base, "method": method, "img_size": img_size}
        if not args.run:
            settings.update(weights=args.weights, backbone=backbone, train_size=args.train_size, val_size=args.val_size)
        train = candidate_trainer(settings, data, Path(args.out) / "runs", args.epochs)

    result = search(
        backbone,
        img_size,
        budget,
        method=method,
        num_classes=classes,
        runtime=args.runtime,
        batch_size=args.batch_size,
        candidates=args.candidates,
        repeats=args.repeats,
        threads=args.threads,
        train=train,
        train_top=args.train_top,
        log=lambda m: print(m, file=sys.stderr),
    )
    for path in write_results(result, Path(args.out)):
        print(path)
    chosen = result["chosen"]
    if chosen is None:
        raise FpetError(f"no timed schedule met the budget; see {Path(args.out) / 'schedules.md'}")
    print(
        f"chosen: {chosen['schedule']} ({chosen['speedup']:.2f}x measured, {chosen['gmacs']:.3f} GMACs)",
        file=sys.stderr,
    )


def add_schedule_parser(sub: argparse._SubParsersAction) -> None:
    schedule = sub.add_parser("schedule", help="merge schedules chosen for a budget").add_subparsers(
        dest="schedule_command", required=True
    )
    p = schedule.add_parser(
        "search",
        help="time candidate schedules on this machine (and optionally train the best few) for a speed or GMACs budget",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--method", default="adaptformer", help="PET method of the models timed")
    p.add_argument("--run", help="take backbone, size, method, classes (and training settings) from a run")
    p.add_argument(
        "--runtime",
        default="onnx",
        choices=["onnx", "torch", "openvino"],
        help="where candidates are timed; openvino: at the precision fpet serve uses on this CPU",
    )
    p.add_argument("--batch-size", type=int, default=8)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--min-speedup", type=float, help="the least merging whose measured speedup is at least X")
    budget.add_argument("--max-gmacs", type=float, help="the least merging within G GMACs per image")
    p.add_argument("--candidates", type=int, default=8, help="schedules timed (after pruning by GMACs)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="latency only (the default without --data or --run)")
    p.add_argument("--data", help="train the most promising candidates on this data and choose by accuracy")
    p.add_argument("--epochs", type=int, default=5, help="with --data: epochs per trained candidate")
    p.add_argument("--train-top", type=int, default=3, help="with --data: how many candidates to train")
    p.add_argument("--weights", default="dinov2_vits14", help="with --data and no --run: backbone weights")
    p.add_argument("--train-size", type=int, default=800, help="with --data and no --run: training images")
    p.add_argument("--val-size", type=int, default=200, help="with --data and no --run: validation images")
    p.add_argument("--out", default="schedule-search", help="folder for schedules.json, schedules.md, pareto.png")
    p.set_defaults(func=cmd_schedule_search)
