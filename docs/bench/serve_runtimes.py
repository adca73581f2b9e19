"""The service under load in each runtime configuration: `fpet serve` as a user starts it (no flags: OpenVINO bf16 on
a CPU with a bf16 matrix engine) against `FPET_RUNTIME=onnxruntime FPET_PRECISION=fp32` (and any other settings
given), each loaded by wrk at 16 connections with the small sample PNGs, both variants, in interleaved rounds (one
server at a time on the shared cores: start, load, stop, next configuration). Prints requests/s per configuration and
variant (medians over rounds), the fpet/backbone ratio, and each configuration over the first: from the medians, and
for fpet also within each round (median and range of the rounds' ratios).

    .venv/bin/python docs/bench/serve_runtimes.py --rounds 3 --duration 10
    .venv/bin/python docs/bench/serve_runtimes.py --config instances2=FPET_INSTANCES=2   # more configurations

Another checkout's service is a configuration too (`git worktree add /tmp/before COMMIT`, then
`--config before=PYTHONPATH=/tmp/before`). `--together` keeps every configuration's server up at once (consecutive
ports) and reverses the order every other round, so that a slow spell on the shared cores falls on all of them and no
configuration always follows a start-up: for small differences between checkouts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.http import bench_http  # noqa: E402

CONFIGS = {"default": {}, "onnxruntime fp32": {"FPET_RUNTIME": "onnxruntime", "FPET_PRECISION": "fp32"}}


def serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    fpet = Path(sys.executable).parent / "fpet"
    process = subprocess.Popen(
        [str(fpet), "serve", "--port", str(port)],
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the service did not get ready: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def running(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen]:
    server = serve(env, port, log)
    try:
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def by_round(rps: list[float], first: list[float]) -> str:
    """The ratio within each round, where a slow spell on the shared cores falls on both: median (lowest-highest)."""
    ratios = [a / b for a, b in zip(rps, first, strict=True)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--config", action="append", default=[], help="NAME=VAR=VALUE[,VAR=VALUE...]")
    parser.add_argument("--together", action="store_true", help="all servers up at once, order reversed each round")
    args = parser.parse_args()
    configs = dict(CONFIGS)
    for text in args.config:
        name, _, assignments = text.partition("=")
        configs[name] = dict(item.split("=", 1) for item in assignments.split(","))
    images = sorted((ROOT / "samples").glob("*.png"))
    rps: dict[tuple[str, str], list[float]] = {}
    logs = Path(tempfile.mkdtemp(prefix="serve-runtimes-"))

    def load(r: int, name: str, port: int) -> None:
        url = f"http://127.0.0.1:{port}"
        info = httpx.get(f"{url}/models/fpet").json()
        rows = bench_http(url, images, [args.concurrency], args.duration, ["backbone", "fpet"], client="wrk")
        for row in rows:
            rps.setdefault((name, row["model"]), []).append(row["goodput_rps"])
        setup = f"{info['runtime']} {info['compute_precision']}"
        measured = ", ".join(f"{row['model']} {row['goodput_rps']:.1f} req/s" for row in rows)
        print(f"round {r + 1}: {name} ({setup}): {measured}", file=sys.stderr)

    def log(name: str, r: int | str) -> Path:
        return logs / f"{name.replace(' ', '_')}-{r}.log"

    if args.together:
        with contextlib.ExitStack() as stack:
            for i, name in enumerate(configs):
                stack.enter_context(running(configs[name], args.port + i, log(name, "all")))
            for r in range(args.rounds):
                for i, name in list(enumerate(configs))[:: -1 if r % 2 else 1]:
                    load(r, name, args.port + i)
    else:
        for r in range(args.rounds):
            for name, env in configs.items():
                with running(env, args.port, log(name, r)):
                    load(r, name, args.port)
    first = next(iter(configs))
    print(
        f"wrk, {args.concurrency} connections, {args.duration:.0f} s per case, samples/*.png; medians of "
        f"{args.rounds} interleaved rounds\n"
    )
    print(
        "| configuration | backbone req/s | fpet req/s | fpet/backbone | backbone vs first | fpet vs first "
        "| fpet vs first, by round |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in configs:
        backbone, fpet = (statistics.median(rps[(name, m)]) for m in ("backbone", "fpet"))
        base_b, base_f = (statistics.median(rps[(first, m)]) for m in ("backbone", "fpet"))
        print(
            f"| {name} | {backbone:.1f} | {fpet:.1f} | {fpet / backbone:.2f} | {backbone / base_b:.2f}x | "
            f"{fpet / base_f:.2f}x | {by_round(rps[(name, 'fpet')], rps[(first, 'fpet')])} |"
        )


if __name__ == "__main__":
    main()
