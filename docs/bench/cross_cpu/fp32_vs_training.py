"""An fp32 bundle on this CPU against the per-image test results its run recorded at training, on whatever CPU that
was: accuracy on every Fashion-MNIST test image, how many images changed from right to wrong or back, and the
bundle's self-check here.

    python docs/bench/cross_cpu/fp32_vs_training.py BUNDLE RUN > OUT.json
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from fpet.runtimes import cpu_features
from service.runtime import ModelRunner
from training.checkpoint import read_test_correct
from training.data import open_split

DATA = "/usr/share/datasets/fashion-mnist"
bundle, run = Path(sys.argv[1]), Path(sys.argv[2])
recorded = np.array(read_test_correct(run, DATA), dtype=bool)
runner = ModelRunner(bundle, providers="cpu", runtime="onnxruntime")
source = open_split(DATA, "test")
start = time.perf_counter()
predictions = []
for i in range(0, len(source.labels), 8):
    batch = [runner.preprocess(source.open_image(j).convert("RGB")) for j in range(i, min(i + 8, len(source.labels)))]
    predictions.append(runner.run(np.stack(batch)).argmax(-1))
correct = np.concatenate(predictions) == np.array(source.labels)
check = runner.self_check(8)
result = {
    "bundle": str(bundle),
    "cpu_features": cpu_features(),
    "images": len(correct),
    "accuracy_here": round(100 * correct.mean(), 2),
    "accuracy_recorded_at_training": round(100 * recorded.mean(), 2),
    "images_whose_correctness_differs": int((correct != recorded).sum()),
    "selfcheck": {k: check.get(k) for k in ("passed", "max_abs_error", "top1_agreement", "compute_precision")},
    "seconds": round(time.perf_counter() - start, 1),
}
print(json.dumps(result, indent=2))
