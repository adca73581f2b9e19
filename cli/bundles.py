"""`fpet export` (runs into verified bundles, multi-task bundles, Triton repositories) and `fpet pull`."""

from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> None:
    from fpet.errors import FpetError

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if args.default:
        from export.defaults import ensure_default_bundles

        for variant, path in ensure_default_bundles(force=args.force, log=log).items():
            print(f"{variant}\t{path}")
        return
    if args.tasks:
        if args.run or args.format not in (None, "onnx") or not args.out:
            raise FpetError("--tasks takes run folders (NAME=RUN to name a task) and --out; its bundle is ONNX")
        from export.multitask import export_multitask, parse_tasks

        manifest = export_multitask(
            parse_tasks(args.tasks),
            args.out,
            variant=args.variant,
            opset=args.opset,
            precision=args.precision,
            quantization=args.quantization,
            log=log,
        )
        for name, result in manifest["verification"]["tasks"].items():
            mixed = manifest["verification"]["mixed_batch"]["tasks"][name]
            log(f"{name}: max abs error {result['max_abs_error']:.2e} alone, {mixed['max_abs_error']:.2e} mixed")
            if result.get("heldout"):
                h = result["heldout"]
                log(
                    f"{name}: held-out accuracy {h['accuracy']}% (fp32 model {h['reference_accuracy']}%), top-1 "
                    f"agreement {h['top1_agreement']:.3f} on {h['images']} images, in mixed batches"
                )
        print(args.out)
        return
    if not args.run or not args.out:
        raise FpetError("give RUN_DIR and --out BUNDLE_DIR, --tasks RUN... and --out, or --default")
    from export.bundle import parse_formats

    formats = parse_formats(args.format, args.precision)
    if formats == ("triton",):
        from export.triton import TritonOptions, export_triton_repository

        options = TritonOptions(
            task=args.task,
            max_batch_size=args.max_batch_size,
            queue_delay_us=args.queue_delay_us,
            instance_kind=args.instance_kind,
            instances=args.instances,
            tensorrt=args.tensorrt,
            precision=args.precision,
            opset=args.opset,
            quantization=args.quantization,
        )
        for model in export_triton_repository(args.run, args.out, options, log=log):
            print(model)
        return
    from export.exporter import ExportOptions, export_bundle

    options = ExportOptions(
        variant=args.variant,
        formats=formats,
        precision=args.precision,
        opset=args.opset,
        quantization=args.quantization,
    )
    manifest = export_bundle(args.run, args.out, options, log=log)
    for fmt, result in manifest["verification"]["formats"].items():
        log(f"{fmt}: max abs error {result['max_abs_error']:.2e}, top-1 agreement {result['top1_agreement']:.3f}")
    print(args.out)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="freeze a run into a verified ONNX + TorchScript bundle",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", nargs="?", help="run folder written by fpet train")
    p.add_argument("--out", help="bundle folder to write (replaced only after verification passes)")
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="[NAME=]RUN",
        help="a multi-task bundle: one graph for these runs of one backbone, image size and schedule, adapters "
        "chosen per image (task names default to the run folders' names)",
    )
    p.add_argument(
        "--variant", default="fpet", choices=["fpet", "backbone"], help="with merging, or the same model without"
    )
    p.add_argument(
        "--format",
        help="comma-separated: onnx, torchscript; or triton alone: a Triton model repository with both variants "
        "(default: onnx,torchscript; onnx for int8)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="fp32, fp16 (for GPUs; checked here on the CPU provider) or int8 (onnxruntime quantization of the "
        "linear layers, for CPUs; verified on held-out images of the run's data when it is here)",
    )
    p.add_argument(
        "--quantization",
        default="dynamic",
        choices=["dynamic", "static"],
        help="with --precision int8: dynamic (activations quantized per call; onnxruntime's CPU provider), or static "
        "(symmetric QDQ calibrated on 128 of the run's training images; OpenVINO on AMX-INT8/VNNI, TensorRT)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20")
    p.add_argument("--default", action="store_true", help="build both bundles of the default model into the cache")
    p.add_argument("--force", action="store_true", help="with --default: rebuild even when up to date")
    triton = p.add_argument_group("with --format triton")
    triton.add_argument("--task", help="models are named <variant>_<task> (default: the run folder's name)")
    triton.add_argument("--max-batch-size", type=int, default=32, help="Triton's max_batch_size")
    triton.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching's longest queue delay")
    triton.add_argument("--instance-kind", default="auto", choices=["auto", "gpu", "cpu"], help="instance_group kind")
    triton.add_argument("--instances", type=int, default=1, help="model instances per device")
    triton.add_argument("--tensorrt", action="store_true", help="add the TensorRT accelerator (FP16) for GPUs")
    p.set_defaults(func=cmd_export)


def cmd_pull(args: argparse.Namespace) -> None:
    from export.pull import pull_bundles

    pull_bundles(args.uri, args.dest, sha256=args.sha256, timeout=args.timeout, log=print)


def add_pull_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="fetch bundles from a URI into a folder (a Kubernetes initContainer; KServe storage-initializer style)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("uri", help="http(s):// or file:// URL, or a path: a .tar.gz/.tgz/.tar/.zip archive, or a folder")
    p.add_argument("dest", help="folder to fill: each bundle found lands in DEST/<its folder name>")
    p.add_argument("--sha256", help="expected sha256 of the archive (refused if it differs)")
    p.add_argument("--timeout", type=float, default=300.0, help="network timeout in seconds")
    p.set_defaults(func=cmd_pull)
