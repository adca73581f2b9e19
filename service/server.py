"""`fpet serve`: settings from the environment and flags, then uvicorn with a drain that loses no request.

On SIGTERM uvicorn alone would close idle keep-alive connections at once, dropping a request a client sends on one
at that moment. Here (one worker, the default) the server first stops accepting connections (a new one is refused:
the client knows it was never accepted), the apps answer whatever arrives on the open ones with `Connection: close`
(queued work with 200, new work with 503), and only once they have been quiet for a moment does uvicorn's own
shutdown run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from types import FrameType

from pydantic import SecretStr, ValidationError

from fpet.errors import FpetError
from fpet.runtimes import check_available
from service import lifecycle
from service.logs import configure_logging
from service.settings import Settings

log = logging.getLogger("fpet.service")
QUIET_S = 0.3  # no request running or arriving for this long: what clients sent before the SIGTERM is answered
QUIET_WAIT_S = 10.0  # at most this long: each open connection is closed after its next answer


def draining_server(config):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            self.drain_started = False
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            """A signal handler: it only schedules work on the loop (no locks, no metrics here)."""
            if sig != signal.SIGTERM or self.drain_started or not getattr(self, "servers", None):
                super().handle_exit(sig, frame)
                return
            self.drain_started = True
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain(sig, frame)))

        async def drain(self, sig: int, frame: FrameType | None) -> None:
            for server in self.servers:
                server.close()  # new connections are refused from now on
            lifecycle.begin_drain()
            deadline = time.monotonic() + min(self.config.timeout_graceful_shutdown or QUIET_WAIT_S, QUIET_WAIT_S)
            while time.monotonic() < deadline and not lifecycle.quiet_since(QUIET_S):
                await asyncio.sleep(0.05)
            log.info("drained: handing over to uvicorn's shutdown")
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def serve(overrides: dict) -> None:
    import uvicorn
    import uvicorn.config
    from uvicorn.supervisors import Multiprocess

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FpetError(f"{where + ': ' if where else ''}{first['msg']}".removeprefix("Value error, ")) from None
    # A runtime or precision this machine cannot give is a one-line error now, not a service that never gets ready
    # (what depends on the bundles, such as an int8 bundle's precision, is checked as they load).
    check_available(settings.runtime, settings.precision)
    if settings.grpc_port is not None and settings.workers > 1:
        raise FpetError(
            "gRPC is served by one process: use --workers 1 with --grpc-port (FPET_GRPC_PORT), and scale with replicas"
        )
    configure_logging(settings.log_format)
    # Workers and the factory read settings from the environment: pass the flags on that way.
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            os.environ[f"FPET_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    if settings.workers > 1:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="fpet-metrics-")
        shutil.rmtree(folder, ignore_errors=True)  # stale files from an earlier run would be summed in
        os.makedirs(folder)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # uvicorn re-raises the SIGTERM it drained on; exiting 0 then tells Docker and Kubernetes the stop was clean.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    log.info("serving on http://%s:%s (docs at /docs); ready once /readyz answers 200", settings.host, settings.port)
    text_logs = settings.log_format == "text"  # JSON: the service writes one access record per request itself
    config = uvicorn.Config(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        log_level="info",
        access_log=text_logs,
        log_config=uvicorn.config.LOGGING_CONFIG if text_logs else None,
    )
    if settings.workers > 1:  # uvicorn's supervisor runs its own servers: its drain, not this one
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = draining_server(config)
    server.run()
    if not server.started:
        raise SystemExit(1)  # uvicorn has logged why (the port is taken, the app did not start)
