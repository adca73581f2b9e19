"""An int8 bundle's accuracy on every Fashion-MNIST test image against the per-image results its fp32 run recorded
at training, in each way this CPU can run it: OpenVINO (its int8 products), onnxruntime (its integer kernels) and
onnxruntime with graph optimisation off, which runs the QDQ graph as written (round to int8, then fp32 products):
what the quantization itself costs, whatever integer instructions the CPU has.

    python docs/bench/cross_cpu/int8_vs_training.py BUNDLE RUN [SETUP ...] > OUT.json

SETUP: openvino, onnxruntime or onnxruntime:LEVEL (default: all three, LEVEL ORT_DISABLE_ALL).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.onnx_runtime import bundle_predictions
from export.bundle import read_manifest
from fpet.runtimes import cpu_features
from training.checkpoint import read_test_correct

DATA = Path("/usr/share/datasets/fashion-mnist")
bundle, run = Path(sys.argv[1]), Path(sys.argv[2])
setups = sys.argv[3:] or ["openvino", "onnxruntime", "onnxruntime:ORT_DISABLE_ALL"]
stored = read_test_correct(run, str(DATA))
if stored is None:
    raise SystemExit(f"{run} has no per-image results on {DATA}: fpet evaluate {run} --data {DATA}")
recorded = np.array(stored, dtype=bool)
results = []
for setup in setups:
    runtime, _, level = setup.partition(":")
    start = time.perf_counter()
    predicted, truth = bundle_predictions(bundle, DATA, runtime=runtime, optimization=level or None)
    correct = predicted == truth
    results.append(
        {
            "setup": setup,
            "accuracy": round(100 * correct.mean(), 2),
            "points_vs_fp32": round(100 * (correct.mean() - recorded.mean()), 2),
            "right_only_in_int8": int((correct & ~recorded).sum()),
            "right_only_in_fp32": int((recorded & ~correct).sum()),
            "seconds": round(time.perf_counter() - start, 1),
        }
    )
    print(json.dumps(results[-1]), file=sys.stderr)
print(
    json.dumps(
        {
            "bundle": str(bundle),
            "run": str(run),
            "quantization": read_manifest(bundle).get("quantization"),
            "cpu_features": cpu_features(),
            "images": len(recorded),
            "fp32_accuracy_recorded_at_training": round(100 * recorded.mean(), 2),
            "results": results,
        },
        indent=2,
    )
)
