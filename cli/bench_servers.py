"""`fpet bench http|memory`: real servers under load, and what they hold in memory."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_bench_http(args: argparse.Namespace) -> None:
    from bench.http import bench_http, markdown, summary
    from bench.output import write_rows

    images = [Path(p) for p in args.image] if args.image else sorted(Path("samples").glob("*.png"))
    if not images:
        from fpet.errors import FpetError

        raise FpetError("no images: give --image FILE (samples/*.png is the default, run from the repository)")
    tasks = args.tasks.split(",") if args.tasks else None
    rows = bench_http(
        args.url.rstrip("/"),
        images,
        [int(c) for c in args.concurrency.split(",")],
        args.duration,
        args.models.split(","),
        tuple(args.routes.split(",")),
        args.client,
        args.repeats,
        tasks,
    )
    print(write_rows(args.out, "http_results", rows, markdown(rows)), end="")
    print(summary(rows), end="")


def cmd_bench_memory(args: argparse.Namespace) -> None:
    import tempfile

    from bench.memory import bench_memory, markdown, parse_case
    from bench.output import write_rows

    cases = [parse_case(text) for text in args.case]
    with tempfile.TemporaryDirectory(prefix="fpet-memory-") as logs:
        rows = bench_memory(cases, Path(args.image), Path(logs))
    print(write_rows(args.out, "memory_results", rows, markdown(rows)), end="")


def add_parsers(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "http",
        help="load a running service from wrk or hey: latency, throughput, errors and server CPU per request",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--models", default="backbone,fpet")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop connections, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per model, route and concurrency")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds per case; the table shows medians")
    p.add_argument("--image", action="append", help="image to send (repeat); default samples/*.png")
    p.add_argument(
        "--tasks", help="comma-separated tasks of a multi-task model: load the first alone, then all in turn (mixed)"
    )
    p.add_argument(
        "--routes",
        default="classify",
        help="comma-separated: classify (the image to /classify), oip-image (as OIP BYTES), oip-pixels (OIP FP32 "
        "pixel_values preprocessed by the client); both OIP kinds as binary tensor data",
    )
    p.add_argument(
        "--client",
        default="auto",
        choices=["auto", "wrk", "hey", "python"],
        help="auto: wrk, else hey (Debian packages); python is an in-process client for where neither is",
    )
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=cmd_bench_http)

    p = bench.add_parser(
        "memory",
        help="memory (PSS, RSS) and disk of real servers: e.g. one multi-task bundle vs a server per task",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--case",
        action="append",
        required=True,
        help="NAME=BUNDLE[,BUNDLE...][;BUNDLE...]: servers split by ';', a server's bundles by ','",
    )
    p.add_argument("--image", default="samples/sneaker.png", help="PNG sent once per task before measuring")
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=cmd_bench_memory)
