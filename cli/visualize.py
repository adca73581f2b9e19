"""`fpet visualize`: which patches were merged, drawn per image and merge point."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_visualize(args: argparse.Namespace) -> None:
    from cli.merge_maps import visualize
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
