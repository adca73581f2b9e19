"""Where a bundle's time goes, layer by layer: OpenVINO's per-layer counters (PERF_COUNT: node type, kernel, its
runtime precision, ms) and onnxruntime's profiler (per-node kernel time), summed by region of the network (the
blocks before the merge, the merge block, the merge itself, the blocks after, the rest) and by node type and
precision. This is how the fp32 LayerNorms, residual adds and precision reorders after the merge were found in the
previous graph, and how the one that replaced it was checked.

    .venv/bin/python docs/bench/profile_layers.py ~/.cache/fpet/bundles/fashion_mnist_fpet_adaptformer/{backbone,fpet}
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from export.bundle import read_manifest

MERGE = re.compile(r"merger|key_mean|/Log")


def region(name: str, merge_block: int | None) -> str:
    """The part of the network a node belongs to, from the exporter's names (/blocks.N/...)."""
    if MERGE.search(name):
        return "merge"
    found = re.search(r"blocks\.(\d+)/", name)
    if not found or merge_block is None:
        return "blocks" if found else "other"
    block = int(found.group(1))
    return "before the merge" if block < merge_block else "merge block" if block == merge_block else "after"


def openvino_layers(model: Path, precision: str, feed: dict, runs: int) -> list[tuple[str, str, str, float]]:
    """(node, type, kernel, median ms) of every executed layer."""
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": {"bf16": "bf16", "fp32": "f32"}[precision],
        "PERF_COUNT": True,
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": 2,
    }
    request = ov.Core().compile_model(str(model), "CPU", config).create_infer_request()
    times: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for run in range(runs + 2):
        request.infer(feed)
        if run < 2:  # warm-up: first runs allocate and pick kernels
            continue
        for p in request.profiling_info:
            if p.status == p.Status.EXECUTED:
                times[(p.node_name, p.node_type, p.exec_type)].append(p.real_time.total_seconds() * 1000)
    return [(*key, statistics.median(values)) for key, values in times.items()]


def onnxruntime_layers(model: Path, feed: dict, runs: int) -> list[tuple[str, str, str, float]]:
    """(node, op type, provider, median ms) from onnxruntime's own profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            times[(node, event["args"]["op_name"], event["args"]["provider"])].append(event["dur"] / 1000)
    return [(*key, statistics.median(values)) for key, values in times.items()]


def summary(layers: list[tuple[str, str, str, float]], merge_block: int | None) -> tuple[dict, dict]:
    by_region: dict[str, float] = collections.Counter()
    by_type: dict[str, float] = collections.Counter()
    for node, kind, kernel, ms in layers:
        by_region[region(node, merge_block)] += ms
        by_type[f"{kind} {kernel.rsplit('_', 1)[-1] if 'Provider' not in kernel else ''}".strip()] += ms
    return dict(by_region), dict(by_type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="node types shown")
    args = parser.parse_args()
    manifests = [read_manifest(bundle) for bundle in args.bundles]
    # one split for all, so that a backbone's blocks line up with its fpet's before and after the merge
    merge_block = next((m["merge_maps"]["points"][0]["block"] for m in manifests if m.get("merge_maps")), None)
    for bundle, manifest in zip(args.bundles, manifests, strict=True):
        size = manifest["img_size"]
        feed = {
            manifest["input"]["name"]: np.random.default_rng(0).random(
                (args.batch_size, 3, size, size), dtype=np.float32
            )
        }
        model = bundle / manifest["files"]["onnx"]
        for name, layers in (
            ("openvino bf16", openvino_layers(model, "bf16", feed, args.runs)),
            ("openvino fp32", openvino_layers(model, "fp32", feed, args.runs)),
            ("onnxruntime fp32", onnxruntime_layers(model, feed, args.runs)),
        ):
            regions, types = summary(layers, merge_block)
            print(
                f"\n{bundle} ({manifest['schedule']}), {name}, batch {args.batch_size}: "
                f"{sum(regions.values()):.2f} ms per batch in {len(layers)} layers"
            )
            print("| region | ms |\n|---|---|\n" + "\n".join(f"| {k} | {v:.2f} |" for k, v in regions.items()))
            top = sorted(types.items(), key=lambda kv: -kv[1])[: args.top]
            print("| node type, precision | ms |\n|---|---|\n" + "\n".join(f"| {k} | {v:.2f} |" for k, v in top))


if __name__ == "__main__":
    main()
