"""The `fpet` command: assembles each command group's parser and turns a user's error into one line.

Each group lives in its own module (cli/train.py, cli/bundles.py, ...), and imports its stage lazily inside the
command, so a command never pays for (or needs) what it does not use.
"""

from __future__ import annotations

import argparse
import sys

from cli import bench_models, bench_servers, bundles, models, schedule, serve, train, visualize, weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpet", description="Faster parameter-efficient tuning of ViTs: FPET.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models.add_describe_parser(sub)
    train.add_train_parser(sub)
    bundles.add_export_parser(sub)
    serve.add_serve_parser(sub)
    bundles.add_pull_parser(sub)
    visualize.add_visualize_parser(sub)
    schedule.add_schedule_parser(sub)
    models.add_compare_parser(sub)
    bench = sub.add_parser("bench", help="measurements: training, onnxruntime and HTTP speed").add_subparsers(
        dest="bench_command", required=True, metavar="WHAT"
    )
    bench_models.add_parsers(bench)
    bench_servers.add_parsers(bench)
    weights.add_weights_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fpet.errors import FpetError

    try:
        args.func(args)
    except FpetError as exc:
        print(f"fpet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; continue with the same command and --resume" if args.command == "train" else ""
        print(f"fpet: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
