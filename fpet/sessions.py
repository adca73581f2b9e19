"""onnxruntime sessions made one way, for the service, export verification and the benchmarks, so that their
numbers are like for like: graph optimisation level, intra-op threads, thread spinning, quiet logs. No torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

OPTIMIZATION = "ORT_ENABLE_ALL"  # measured 3-11% faster than ORT_ENABLE_BASIC on the bundles (docs/benchmarks.md)
CPU = ("CPUExecutionProvider",)


def create_session(
    model: str | Path | bytes, providers: Sequence[str] = CPU, threads: int = 0, optimization: str = OPTIMIZATION
):
    """threads 0: onnxruntime's own choice (one per physical core). Idle intra-op threads sleep instead of spinning:
    in the service they share the cores with decoding and the event loop, which need that CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=list(providers))
