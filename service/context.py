"""One request's context, from arrival to answer, whatever carries it (HTTP or gRPC): created once, then read and
filled by every step of the request path, so no step passes loose values to the next or reaches into
`request.state`. It holds who the request is (its id and headers), when it must be done (its deadline), what it asked
for (model and task, for the access record and the metrics) and what it cost (stage timings, and the marks its trace
is drawn from)."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.errors import ServiceError


@dataclass
class RequestContext:
    request_id: str
    headers: Mapping[str, str]
    deadline_ms: float  # FPET_DEADLINE_MS; X-Request-Timeout-Ms may shorten it
    start: float = field(default_factory=time.perf_counter)
    model: str | None = None
    task: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    marks: list[tuple[str, float, float]] | None = None  # None: nobody traces this request

    @functools.cached_property
    def deadline(self) -> float:
        """`time.perf_counter()` past which the request's work is dropped (504)."""
        budget = self.deadline_ms
        asked = self.headers.get("x-request-timeout-ms")
        if asked is not None:
            try:
                budget = min(budget, float(asked))
            except ValueError:
                raise ServiceError(400, "invalid_request", "X-Request-Timeout-Ms must be a number") from None
        return self.start + budget / 1000

    def mark(self, stage: str, start: float, end: float | None = None) -> None:
        """A stage of the request, for its trace (tracing.Tracer)."""
        if self.marks is not None:
            self.marks.append((stage, start, time.perf_counter() if end is None else end))

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000


async def request_context(request: Request) -> RequestContext:
    """The context the ASGI middleware (service.app.RequestContextMiddleware) made as the request arrived. Async, as
    service.state.get_state: FastAPI would run a plain def in its thread pool, a thread hop on every request."""
    return request.state.context


ContextDep = Annotated[RequestContext, Depends(request_context)]
