"""`fpet bench model|train|onnx`: models and bundles timed side by side, in one process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_bench_model(args: argparse.Namespace) -> None:
    from bench.model import bench_model, markdown, plot
    from bench.output import write_rows

    rows = bench_model(
        args.backbone,
        args.img_size,
        args.schedules.split(","),
        args.runtimes.split(","),
        [int(b) for b in args.batch_sizes.split(",")],
        threads=args.threads,
        device=args.device,
        precisions=args.precisions.split(","),
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(write_rows(args.out, "results", rows, markdown(rows)), end="")
    plots = plot(rows, Path(args.out))
    print(
        f"random weights (speed does not depend on them); wrote {Path(args.out) / 'results.json'}, results.md, "
        f"{', '.join(p.name for p in plots)}"
    )


def cmd_bench_train(args: argparse.Namespace) -> None:
    from bench.output import write_rows
    from bench.train import bench_train, markdown

    rows = bench_train(
        args.backbone,
        args.img_size,
        args.methods.split(","),
        args.schedules.split(","),
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(write_rows(args.out, "train_results", rows, markdown(rows)), end="")
    print("(random weights: speed and memory do not depend on them)")


def cmd_bench_onnx(args: argparse.Namespace) -> None:
    from bench.onnx_runtime import add_accuracy, bench_bundles, markdown
    from bench.output import write_rows

    if args.bundle:
        bundles = [Path(b) for b in args.bundle]
    else:
        from fpet.paths import default_bundle_dir

        bundles = [default_bundle_dir("backbone"), default_bundle_dir("fpet")]
    rows = bench_bundles(
        bundles,
        [int(b) for b in args.batch_sizes.split(",")],
        tuple(args.optimization.split(",")),
        repeats=args.repeats,
        threads=args.threads,
        callers=args.callers,
        runtimes=tuple(args.runtimes.split(",")),
        precisions=tuple(args.precisions.split(",")),
    )
    if args.data:
        add_accuracy(rows, Path(args.data), args.threads, log=lambda message: print(message, file=sys.stderr))
    print(write_rows(args.out, "onnx_results", rows, markdown(rows)), end="")


def add_parsers(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "model",
        help="ms per image per schedule, runtime and batch size, with ideal speedups from GMACs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=None, help="default: the backbone's")
    p.add_argument(
        "--schedules",
        default="none,6:0.5,tome:13,3:0.5+6:0.5+9:0.5",
        help="comma-separated; + joins the points of one schedule",
    )
    p.add_argument(
        "--runtimes",
        default="torch,onnxruntime,torchscript",
        help="comma-separated: torch, onnxruntime (or onnx), torchscript, openvino (CPUs), onnxruntime-tensorrt (or "
        "onnx-tensorrt; GPU, onnxruntime's TensorRT)",
    )
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--precisions",
        "--precision",
        dest="precisions",
        default="fp32",
        help="comma-separated: fp32, fp16, bf16, int8 (onnxruntime-quantized graphs, onnxruntime only); "
        "each runtime runs those it can here",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--min-seconds", type=float, default=0.5, help="shortest sample")
    p.add_argument("--out", default="bench-results/model")
    p.set_defaults(func=cmd_bench_model)

    p = bench.add_parser(
        "train",
        help="training img/s and peak memory per method and schedule, side by side",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--methods", default="adaptformer", help="comma-separated methods")
    p.add_argument("--schedules", default="none,6:0.5", help="comma-separated schedules; the first is the baseline")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (fresh process each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench-results", help="folder for train_results.json and .md")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser(
        "onnx",
        help="ms per image of bundles side by side, per runtime and precision (default: the default backbone and fpet)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bundle", action="append", help="bundle folder (repeat); the first is the baseline")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--runtimes", default="onnxruntime", help="comma-separated: onnxruntime, openvino")
    p.add_argument(
        "--precisions",
        default="fp32,fp16,int8",
        help="comma-separated compute precisions: fp32, bf16, fp16 (OpenVINO computes an fp32 bundle in any it has), "
        "int8 (int8 bundles); what a runtime cannot compute here is left out",
    )
    p.add_argument("--optimization", default="ORT_ENABLE_ALL", help="onnxruntime graph optimisation levels")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of at least 0.5 s each")
    p.add_argument("--threads", type=int, default=2, help="threads per caller (0: the runtime's choice)")
    p.add_argument(
        "--callers",
        type=int,
        default=1,
        help="threads running each session at once, like `fpet serve --instances N` (then set --threads "
        "to the service's per-instance threads); ms/image is then wall time over all callers' images",
    )
    p.add_argument(
        "--data",
        help="also measure each setup's accuracy on every image of this data's test split, and its top-1 "
        "agreement with the bundle in onnxruntime at its own precision",
    )
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=cmd_bench_onnx)
