"""The live compute speedup that a running service reports (`fpet:speedup_compute`: the backbone's batch seconds per
image over fpet's), under three traffic patterns: one request to each variant at a time sent together, the same
requests one after the other, and a closed loop of `connections` per variant on both at once (wrk).

The figure is read from the service's own /metrics, before and after each pattern, exactly as Prometheus would.
Patterns alternate over `rounds`; the medians are reported. The figure is honest when it does not depend on how the
traffic interleaves: `together` close to `sequential`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.http import make_case, run_wrk, settle
from fpet.atomic import write_json_atomic
from fpet.errors import FpetError

MODELS = ("fpet", "backbone")
PATTERNS = ("together", "sequential", "wrk")


def compute_counters(base: str) -> dict[str, tuple[float, float]]:
    """Per variant: summed batch inference seconds and images classified."""
    sums: dict[str, float] = {}
    images: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        for model in MODELS:
            if line.startswith("fpet_batch_inference_duration_seconds_sum{") and f'model="{model}"' in line:
                sums[model] = sums.get(model, 0.0) + float(line.split()[-1])
            if line.startswith(f'fpet_images_total{{model="{model}"}} '):
                images[model] = float(line.split()[-1])
    return {m: (sums.get(m, 0.0), images.get(m, 0.0)) for m in MODELS}


def speedup(before: dict, after: dict) -> float:
    per_image = {}
    for model in MODELS:
        seconds, images = (after[model][i] - before[model][i] for i in (0, 1))
        if images <= 0:
            raise FpetError(f"no images reached {model}: is the service serving both variants?")
        per_image[model] = seconds / images
    return per_image["backbone"] / per_image["fpet"]


def pairs(base: str, image: bytes, requests: int, together: bool) -> None:
    headers = {"Content-Type": "image/png"}
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, ThreadPoolExecutor(2) as pool:
        post = {
            "fpet": lambda: a.post(f"{base}/models/fpet/classify", content=image, headers=headers),
            "backbone": lambda: b.post(f"{base}/models/backbone/classify", content=image, headers=headers),
        }
        for _ in range(requests):
            if together:
                answers = list(pool.map(lambda model: post[model](), MODELS))
            else:
                answers = [post[model]() for model in MODELS]
            for answer in answers:
                answer.raise_for_status()


def both_wrk(base: str, image: bytes, connections: int, seconds: float) -> float:
    """Both variants' answers per second together."""
    cases = [make_case(base, "classify", model, [image]) for model in MODELS]
    with tempfile.TemporaryDirectory(prefix="fpet-live-") as folder, ThreadPoolExecutor(2) as pool:
        folders = [Path(folder) / model for model in MODELS]
        for path in folders:
            path.mkdir()
        results = list(pool.map(lambda i: run_wrk(cases[i], connections, seconds, folders[i]), range(2)))
    for result in results:
        if result["errors"]:
            raise FpetError(f"wrk saw errors: {result['errors']}")
    return sum(r["ok"] / r["seconds"] for r in results)


def measure(
    base: str, image: bytes, pattern: str, requests: int, connections: int, seconds: float
) -> tuple[float, float | None]:
    """The speedup the service reports for the pattern's traffic, and (wrk) the answers per second."""
    settle(base)
    before = compute_counters(base)
    throughput = None
    if pattern == "wrk":
        throughput = both_wrk(base, image, connections, seconds)
    else:
        pairs(base, image, requests, pattern == "together")
    settle(base)
    return speedup(before, compute_counters(base)), throughput


def bench_live(
    base: str, image: bytes, rounds: int = 5, requests: int = 40, connections: int = 8, seconds: float = 10.0
) -> dict:
    runs: dict[str, list[float]] = {p: [] for p in PATTERNS}
    throughput: list[float] = []
    for r in range(rounds):
        order = PATTERNS if r % 2 == 0 else PATTERNS[::-1]
        for pattern in order:
            ratio, answers = measure(base, image, pattern, requests, connections, seconds)
            runs[pattern].append(ratio)
            if answers is not None:
                throughput.append(answers)
    medians = {p: statistics.median(v) for p, v in runs.items()}
    return {
        "runs": runs,
        "median": medians,
        "together_over_sequential": medians["together"] / medians["sequential"],
        "wrk_answers_per_second": {"runs": throughput, "median": statistics.median(throughput)},
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", default="samples/ankle_boot.png")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40, help="request pairs per round (together, sequential)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections per variant")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per round")
    parser.add_argument("--out", help="write the result here as JSON")
    args = parser.parse_args()
    result = bench_live(
        args.url.rstrip("/"), Path(args.image).read_bytes(), args.rounds, args.requests, args.connections, args.seconds
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
