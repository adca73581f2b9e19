"""Logits of a bundle on the first N Fashion-MNIST test images, and its self-check, on whatever CPU runs this: run it
natively and under `qemu-x86_64 -cpu Haswell` (an AVX2-only CPU, no AVX-512 or VNNI) to compare instruction sets.

    python docs/bench/cross_cpu/logits.py BUNDLE N OUT.npz
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from fpet.runtimes import cpu_features
from service.runtime import ModelRunner
from training.data import open_split

bundle, count, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
runner = ModelRunner(bundle, providers="cpu", threads=1, runtime="onnxruntime")  # no spinning pool under TCG
source = open_split("/usr/share/datasets/fashion-mnist", "test")
inputs = np.stack([runner.preprocess(source.open_image(i).convert("RGB")) for i in range(count)])
start = time.perf_counter()
logits = np.concatenate([runner.run(inputs[i : i + 8]) for i in range(0, count, 8)])
seconds = time.perf_counter() - start
check = runner.self_check(8)
np.savez(
    out,
    logits=logits,
    labels=np.array(source.labels[:count]),
    facts=np.array(json.dumps({"cpu_features": list(cpu_features()), "seconds": seconds, "selfcheck": check})),
)
print(
    json.dumps(
        {
            "bundle": str(bundle),
            "cpu_features": cpu_features(),
            "seconds": round(seconds, 1),
            "selfcheck_passed": check["passed"],
            "selfcheck_max_abs_error": check.get("max_abs_error"),
        }
    )
)
