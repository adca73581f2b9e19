"""What the merge costs, graph against graph: ms per image of a random-weight ViT exported without merging, with a
schedule, with the same schedule whose merge is free (the A tokens dropped: same token counts, no matching, no
product), and optionally the same schedule exported by an earlier checkout of this repository (the graph before a
change), all run side by side in interleaved rounds on each runtime and precision asked for.

The free merge bounds what any merge can give on this machine: the rest of the gap to the GMACs ratio is the
smaller matrix products after the merge running less efficiently, not the merge. Each graph is exported in its own
process (by its own source tree), with the project's exporter, so both are exactly what `fpet export` writes.

    .venv/bin/python docs/bench/merge_cost.py --backbone vit_base_patch16_224 --img-size 224 --batch-sizes 8 \\
        --before-tree /tmp/before        # a `git worktree add /tmp/before <commit>` of the earlier graph
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.onnx_runtime import timed_runs  # noqa: E402

EXPORT = """
import sys, warnings
sys.path.insert(0, {tree!r})
warnings.simplefilter("ignore")
import torch
from fpet import merge
from fpet.vit import create_model
from export.exporter import export_onnx
if {free}:  # the A tokens dropped: the merged token counts at no cost
    merge.merge_tokens = lambda x, size, scores, a, b, k, learned, groups=None: (
        x.index_select(1, b), torch.ones_like(x[:, : b.numel(), :1]), groups)
torch.manual_seed(0)
model = create_model({backbone!r}, num_classes=10, img_size={size}, method={method!r}, schedule={schedule!r})
model = model.freeze_for_deployment().set_fused_attention(False)
export_onnx(model, {out!r}, torch.rand(2, 3, {size}, {size}), 17, maps=model.merges)
"""


def export(tree: Path, out: Path, args: argparse.Namespace, schedule: str, free: bool = False) -> Path:
    code = EXPORT.format(
        tree=str(tree),
        free=free,
        backbone=args.backbone,
        size=args.img_size,
        method=args.method,
        schedule=schedule,
        out=str(out),
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tree)
    return out


def session(path: Path, runtime: str, precision: str, streams: int):
    """One session on the 2 cores: `streams` callers of 2 / streams threads each, as `fpet serve --instances`."""
    from fpet.runtimes import OpenVinoSession
    from fpet.sessions import create_session

    threads = max(1, 2 // streams)
    if runtime == "openvino":
        return OpenVinoSession(path, precision, threads * streams, streams)
    return create_session(path, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--method", default="adaptformer")
    parser.add_argument("--schedule", default="6:0.5")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--setups",
        default="openvino:bf16",
        help="runtime:precision[:streams], comma-separated (streams: batches run at once)",
    )
    parser.add_argument("--before-tree", type=Path, help="a checkout of the earlier graph's source")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="merge-cost-"))
    graphs = {
        "none": export(ROOT, folder / "none.onnx", args, "none"),
        args.schedule: export(ROOT, folder / "fpet.onnx", args, args.schedule),
        "free merge": export(ROOT, folder / "free.onnx", args, args.schedule, free=True),
    }
    if args.before_tree:
        graphs["before"] = export(args.before_tree.resolve(), folder / "before.onnx", args, args.schedule)
    print(
        f"{args.backbone} at {args.img_size} px, {args.method}, random weights; ms per image, median of "
        f"{args.rounds} interleaved rounds; speedup over `none` in the same setup and round\n"
    )
    print(f"| setup | batch | {' | '.join(graphs)} |\n|---|---|" + "---|" * len(graphs))
    for setup in args.setups.split(","):
        runtime, precision, *rest = setup.split(":")
        streams = int(rest[0]) if rest else 1
        sessions = {name: session(path, runtime, precision, streams) for name, path in graphs.items()}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            feed = {"input": np.random.default_rng(0).random((batch, 3, args.img_size, args.img_size), np.float32)}
            samples: dict[str, list[float]] = {name: [] for name in sessions}
            for sess in sessions.values():
                sess.run(["logits"], feed)
            for _ in range(args.rounds):
                for name, sess in sessions.items():
                    count, elapsed = timed_runs(sess, ["logits"], feed, args.seconds, streams)
                    samples[name].append(1000 * elapsed / (count * batch))
            ms = {name: statistics.median(values) for name, values in samples.items()}
            cells = [f"{value:.2f} ({ms['none'] / value:.3f}x)" for value in ms.values()]
            print(
                f"| {runtime} {precision}{f' {streams} streams' if streams > 1 else ''} | {batch} | "
                f"{' | '.join(cells)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
