"""`fpet serve`: settings from the environment and flags, then uvicorn."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile

from service.settings import Settings


def serve(overrides: dict) -> None:
    import uvicorn

    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Workers and the factory read settings from the environment: pass the flags on that way.
    for name, value in settings.model_dump(exclude_none=True).items():
        if name == "api_key":
            value = settings.api_key.get_secret_value() if settings.api_key else None
        if value is not None:
            os.environ[f"FPET_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    if settings.workers > 1:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="fpet-metrics-")
        shutil.rmtree(folder, ignore_errors=True)  # stale files from an earlier run would be summed in
        os.makedirs(folder)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # uvicorn re-raises the SIGTERM it drained on; exiting 0 then tells Docker and Kubernetes the stop was clean.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(
        f"serving on http://{settings.host}:{settings.port} (docs at /docs); ready once /readyz answers 200", flush=True
    )
    uvicorn.run(
        "service.app:create_app", factory=True, host=settings.host, port=settings.port, workers=settings.workers,
        timeout_graceful_shutdown=int(settings.drain_timeout_s), log_level="info",
    )  # fmt: skip
