"""The table for docs/benchmarks.md from logits.py's outputs: per bundle, accuracy natively and emulated, and the
top-1 agreement and largest logit difference between the two CPUs.

    python docs/bench/cross_cpu/compare.py RESULTS_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1])
rows = []
for native in sorted(folder.glob("*-native.npz")):
    name = native.name.removesuffix("-native.npz")
    emulated = folder / f"{name}-haswell.npz"
    a, b = np.load(native), np.load(emulated)
    facts = {k: json.loads(str(x["facts"])) for k, x in (("native", a), ("haswell", b))}
    rows.append(
        {
            "bundle": name,
            "images": len(a["labels"]),
            "accuracy_native": float((a["logits"].argmax(1) == a["labels"]).mean()),
            "accuracy_haswell": float((b["logits"].argmax(1) == b["labels"]).mean()),
            "top1_agreement": float((a["logits"].argmax(1) == b["logits"].argmax(1)).mean()),
            "max_abs_logit_difference": float(np.abs(a["logits"] - b["logits"]).max()),
            "selfcheck": {
                k: {
                    "passed": f["selfcheck"]["passed"],
                    "max_abs_error": f["selfcheck"].get("max_abs_error"),
                    "limit": f["selfcheck"].get("thresholds", {}).get("max_abs_error"),
                }
                for k, f in facts.items()
            },
            "cpu_features": {k: f["cpu_features"] for k, f in facts.items()},
            "seconds": {k: round(f["seconds"], 1) for k, f in facts.items()},
        }
    )
print(json.dumps(rows, indent=2))
