"""Shadow agreement on a labelled split, against a running service started with `FPET_SHADOW_RATE=1`: each image goes
to /classify (the default variant, shadowed on the reference), one at a time so the service is idle when the shadow
run is decided, then to /classify/compare for a direct comparison of the two variants and their accuracy against the
labels. Reports the agreement the service counted next to the one measured directly.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx

from bench.http import settle
from fpet.atomic import write_json_atomic
from training.data import open_split

SHADOW = "fpet_shadow_requests_total"


def shadow_counts(base: str) -> dict[str, float]:
    found = {"true": 0.0, "false": 0.0, "dropped": 0.0}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{SHADOW}{{"):
            found["true" if 'agree="true"' in line else "false"] += float(line.split()[-1])
        elif line.startswith("fpet_shadow_dropped_total{"):
            found["dropped"] += float(line.split()[-1])
    return found


def png(image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG")
    return out.getvalue()


def bench_shadow(base: str, data: str, images: int) -> dict:
    source = open_split(data, "test")
    before = shadow_counts(base)
    direct, correct = 0, {"fpet": 0, "backbone": 0}
    headers = {"Content-Type": "image/png"}
    with httpx.Client(timeout=60) as client:
        for i in range(images):
            with source.open_image(i) as image:
                body = png(image)
            client.post(f"{base}/classify", content=body, headers=headers).raise_for_status()
            settle(base)
            compared = client.post(f"{base}/classify/compare", content=body, headers=headers)
            compared.raise_for_status()
            models = compared.json()["models"]
            direct += compared.json()["top1_agreement"]
            for name in correct:
                correct[name] += models[name]["predictions"][0]["index"] == source.labels[i]
    time.sleep(0.5)
    after = shadow_counts(base)
    counted = {k: after[k] - before[k] for k in after}
    shadowed = counted["true"] + counted["false"]
    return {
        "images": images,
        "shadowed": shadowed,
        "dropped": counted["dropped"],
        "shadow_agreement": counted["true"] / shadowed if shadowed else None,
        "direct_agreement": direct / images,
        "accuracy": {name: n / images for name, n in correct.items()},
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--images", type=int, default=2000, help="the first N test images")
    parser.add_argument("--out", help="write the result here as JSON")
    args = parser.parse_args()
    result = bench_shadow(args.url.rstrip("/"), args.data, args.images)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
