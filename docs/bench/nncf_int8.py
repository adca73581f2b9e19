"""NNCF's post-training int8 against OpenVINO reading the project's static QDQ bundle, on the CPU: speed only.

Issue 23 asked for int8 on the matrix engine through NNCF or through OpenVINO reading the bundle's QDQ graph; the
project ships the second (`fpet export --precision int8 --quantization static`, the form Triton and TensorRT load too).
This measures whether NNCF's own placement (`ModelType.TRANSFORMER`, symmetric `PERFORMANCE` preset, the merge
metric's layer left in float as in export/quantize.py) runs faster: ms per image of each variant as NNCF int8, as the
static QDQ bundle, and as the fp32 bundle in bf16, each compiled as the service does (fpet.runtimes.OpenVinoSession)
and timed as `fpet bench onnx` times, in interleaved rounds of about a second each. The ranges are calibrated on
random images, which is enough for speed and says nothing of accuracy. NNCF is not part of the install:

    .venv/bin/pip install --target /tmp/nncf_site --no-deps nncf tabulate psutil scipy
    PYTHONPATH=/tmp/nncf_site .venv/bin/python docs/bench/nncf_int8.py --int8 int8   # int8/static_{backbone,fpet}
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import nncf
import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.onnx_runtime import timed_runs  # noqa: E402
from fpet.runtimes import OpenVinoSession  # noqa: E402

DEFAULT_BUNDLES = Path.home() / ".cache/fpet/bundles/fashion_mnist_fpet_adaptformer"
SIZE = 112
THREADS = 2


def nncf_int8(src: Path, dst: Path, images: list[np.ndarray]) -> Path:
    """The fp32 bundle quantized by NNCF, written as OpenVINO IR at `dst`."""
    model = ov.Core().read_model(str(src))
    name = model.inputs[0].get_any_name()
    quantized = nncf.quantize(
        model,
        nncf.Dataset(images, lambda x: {name: x}),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(images),  # batches: NNCF counts the items its dataset yields
        ignored_scope=nncf.IgnoredScope(patterns=[".*key_mean.*"], validate=False),
    )
    ov.save_model(quantized, str(dst))
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, default=DEFAULT_BUNDLES, help="the fp32 backbone/ and fpet/ bundles")
    parser.add_argument("--int8", type=Path, required=True, help="folder of static_backbone/ and static_fpet/")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="least time per measurement")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((8, 3, SIZE, SIZE), dtype=np.float32) for _ in range(16)]
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="nncf-int8-") as tmp:
        for variant in ("backbone", "fpet"):
            fp32 = args.bundles / variant / "model.onnx"
            nncf_ir = nncf_int8(fp32, Path(tmp) / f"{variant}.xml", images)
            sessions[f"{variant}, NNCF int8"] = OpenVinoSession(nncf_ir, "int8", THREADS)
            qdq = args.int8 / f"static_{variant}" / "model.onnx"
            sessions[f"{variant}, static QDQ bundle"] = OpenVinoSession(qdq, "int8", THREADS)
            sessions[f"{variant}, fp32 bundle in bf16"] = OpenVinoSession(fp32, "bf16", THREADS)
    feed = {"input": rng.standard_normal((args.batch_size, 3, SIZE, SIZE), dtype=np.float32)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        sess.run(["logits"], feed)  # the first call's one-off work stays out of the rounds
    for _ in range(args.rounds):
        for name, sess in sessions.items():
            runs, elapsed = timed_runs(sess, ["logits"], feed, args.seconds)
            times[name].append(elapsed / runs / args.batch_size * 1000)
    print(f"batch {args.batch_size}, ms per image, median (fastest) of {args.rounds} interleaved rounds\n")
    print("| model | ms per image |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}) |")


if __name__ == "__main__":
    main()
