"""Logging as the operator asks for it: uvicorn's text lines, or JSON, one object per line, for log collectors
(Loki, Elasticsearch, Cloud Logging) that index fields rather than parse text. In JSON, each request is one access
record (the service writes it: it knows the model, the task and the stage timings that uvicorn's line lacks), and
every other record, errors with their traceback included, is an object of its own."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

ACCESS = logging.getLogger("fpet.access")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str) -> None:
    """Text: as before (uvicorn writes its access lines). JSON: the root logger formats every record, uvicorn's
    included (serve passes it no logging config of its own, so its records reach the root)."""
    if log_format != "json":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def access(fields: dict) -> None:
    """One request's record: `fields` become top-level keys of its JSON object."""
    ACCESS.info("%s %s %s", fields.get("method"), fields.get("route"), fields.get("status"), extra=fields)
