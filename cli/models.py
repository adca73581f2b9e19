"""`fpet describe` (a configuration's tokens, GMACs and parameters) and `fpet compare` (paired tests of two models)."""

from __future__ import annotations

import argparse
import json
import sys


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


def add_describe_parser(sub: argparse._SubParsersAction) -> None:
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
