"""What the operator sees of each request once it is answered, whatever carried it (HTTP or gRPC): its JSON access
record (`FPET_LOG_FORMAT=json`) and its trace (`FPET_OTLP_ENDPOINT`)."""

from __future__ import annotations

from service import logs
from service.state import State


def observed(
    state: State,
    fields: dict,
    headers: dict[str, str],
    start: float,
    end: float,
    marks: list[tuple[str, float, float]],
    failed: bool,
) -> None:
    """`fields`: the access record's (request_id, method, route, path, model, task, status, bytes, client, stages_ms);
    `marks`: the stages as RequestContext.mark recorded them."""
    if state.settings.log_format == "json":
        logs.access({**fields, "duration_ms": round((end - start) * 1000, 3)})
    if state.tracer is not None:
        attributes = {
            "http.request.method": fields["method"],
            "http.route": fields["route"],
            "url.path": fields["path"],
            "fpet.status": str(fields["status"]),
            "fpet.request_id": fields["request_id"],
            **{f"fpet.{k}": fields[k] for k in ("model", "task") if fields[k] is not None},
        }
        if isinstance(fields["status"], int):
            attributes["http.response.status_code"] = fields["status"]
        name = f"{fields['method']} {fields['route']}"
        state.tracer.record(name, headers, start, end, attributes, marks, failed)


def wanted(state: State) -> bool:
    return state.settings.log_format == "json" or state.tracer is not None
