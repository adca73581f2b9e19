"""NNCF's post-training int8 against OpenVINO reading the project's static QDQ bundle, on the CPU: speed only.

Issue 23 asked for int8 on the matrix engine through NNCF or through OpenVINO reading the bundle's QDQ graph; the
project ships the second (`fpet export --precision int8 --quantization static`, the form Triton and TensorRT load too).
This measures whether NNCF's own placement (`ModelType.TRANSFORMER`, symmetric `PERFORMANCE` preset, the merge
metric's layer left in float as in export/quantize.py) runs faster: ms per image of each variant as NNCF int8, as the
static QDQ bundle, and as the fp32 bundle in bf16, one stream, in interleaved rounds of about a second each. The
ranges are calibrated on random images, which is enough for speed and says nothing of accuracy. NNCF is not part of
the install:

    .venv/bin/pip install --target /tmp/nncf_site --no-deps nncf tabulate psutil scipy
    PYTHONPATH=/tmp/nncf_site .venv/bin/python docs/bench/nncf_int8.py --int8 int8   # int8/static_{backbone,fpet}
"""

import argparse
import statistics
import time
from pathlib import Path

import nncf
import numpy as np
import openvino as ov

DEFAULT_BUNDLES = Path.home() / ".cache/fpet/bundles/fashion_mnist_fpet_adaptformer"
SIZE = 112


def nncf_int8(core: ov.Core, path: Path, images: list[np.ndarray]) -> ov.CompiledModel:
    model = core.read_model(str(path))
    name = model.inputs[0].get_any_name()
    quantized = nncf.quantize(
        model,
        nncf.Dataset(images, lambda x: {name: x}),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(images),  # batches: NNCF counts the items its dataset yields
        ignored_scope=nncf.IgnoredScope(patterns=[".*key_mean.*"], validate=False),
    )
    return core.compile_model(quantized, "CPU", {"NUM_STREAMS": 1})


def ms_per_image(request: ov.InferRequest, batch: np.ndarray, seconds: float = 1.0) -> float:
    request.infer({0: batch})
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        request.infer({0: batch})
        calls += 1
    return (time.perf_counter() - start) / calls / len(batch) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, default=DEFAULT_BUNDLES, help="the fp32 backbone/ and fpet/ bundles")
    parser.add_argument("--int8", type=Path, required=True, help="folder of static_backbone/ and static_fpet/")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((8, 3, SIZE, SIZE), dtype=np.float32) for _ in range(16)]
    core = ov.Core()
    compiled = {}
    for variant in ("backbone", "fpet"):
        fp32 = args.bundles / variant / "model.onnx"
        compiled[f"{variant}, NNCF int8"] = nncf_int8(core, fp32, images)
        qdq = str(args.int8 / f"static_{variant}" / "model.onnx")
        compiled[f"{variant}, static QDQ bundle"] = core.compile_model(qdq, "CPU", {"NUM_STREAMS": 1})
        bf16 = {"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "bf16"}
        compiled[f"{variant}, fp32 bundle in bf16"] = core.compile_model(str(fp32), "CPU", bf16)
    requests = {name: model.create_infer_request() for name, model in compiled.items()}
    batch = rng.standard_normal((args.batch_size, 3, SIZE, SIZE), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(args.rounds):
        for name, request in requests.items():
            times[name].append(ms_per_image(request, batch))
    print(f"batch {args.batch_size}, ms per image, median (fastest) of {args.rounds} interleaved rounds\n")
    print("| model | ms per image |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}) |")


if __name__ == "__main__":
    main()
