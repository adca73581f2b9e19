"""`fpet serve`: flags override the service's FPET_* settings (service.settings holds the defaults)."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> None:
    from service.server import serve

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    serve(overrides)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve bundles over HTTP: POST /classify, /metrics (settings: FPET_* variables; flags override them)",
    )
    p.add_argument("--host", help="default 127.0.0.1 (FPET_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (FPET_PORT)")
    p.add_argument("--grpc-port", type=int, help="also serve the OIP over gRPC here (FPET_GRPC_PORT; default off)")
    p.add_argument(
        "--bundle", dest="bundles", action="append", help="bundle folder (repeat); default: the default model's two"
    )
    p.add_argument("--default-model", help="variant /classify uses without ?model= (default fpet)")
    p.add_argument("--workers", type=int, help="uvicorn workers (default 1; metrics switch to multiprocess mode)")
    p.add_argument(
        "--runtime",
        choices=["auto", "onnxruntime", "openvino"],
        help="default auto: OpenVINO on CPUs with a bf16 matrix engine (AMX, AVX512-BF16), onnxruntime elsewhere",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision (default auto: bf16 with OpenVINO, the bundle's own with onnxruntime)",
    )
    p.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when onnxruntime has it")
    p.add_argument("--threads", type=int, help="threads per instance (default: cores/instances)")
    p.add_argument("--instances", type=int, help="batches per model run side by side (default 1)")
    p.add_argument("--max-batch-size", type=int, help="default 32 on a GPU, 8 on a CPU")
    p.add_argument("--max-delay-ms", type=float, help="default 2")
    p.add_argument("--max-queue-images", type=int, help="default 64")
    p.add_argument("--deadline-ms", type=float, help="default 10000")
    p.add_argument("--max-bytes", type=int, help="default 8 MiB")
    p.add_argument("--max-pixels", type=int, help="default 40000000")
    p.add_argument("--max-request-pixels", type=int, help="all of a request's decoded images (default 40000000)")
    p.add_argument("--max-images", type=int, help="default 16")
    p.add_argument("--api-key", help="require this key on the classify endpoints (FPET_API_KEY)")
    p.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        help="explicit: load and unload models at run time via /v2/repository (needs FPET_ADMIN_KEY); default none",
    )
    p.add_argument("--shadow-rate", type=float, help="share of fpet's requests also run on the backbone (default 0)")
    p.add_argument("--log-format", choices=["text", "json"], help="default text (FPET_LOG_FORMAT)")
    p.add_argument("--otlp-endpoint", help="send request traces here over OTLP/HTTP (FPET_OTLP_ENDPOINT; default off)")
    p.set_defaults(func=cmd_serve)
