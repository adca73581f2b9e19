"""Structured logs and traces: `fpet serve --log-format json` writes lines that parse, one access record per request
and errors as JSON too; with an OTLP endpoint every request's spans reach a real OTLP/HTTP receiver (protobuf
decoded by opentelemetry-proto), in the caller's trace, with a child span per stage."""

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import tritonclient.grpc as grpcclient
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from service.app import create_app
from service.settings import Settings
from tests.helpers.images import jpeg
from tests.helpers.oip import grpc_image_input
from tests.helpers.servers import free_port, start_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def test_json_logs_are_one_object_per_line_with_each_requests_fields(tiny_bundles, tmp_path):
    grpc_port = free_port()
    process, base = start_server(
        tiny_bundles,
        tmp_path,
        "--log-format",
        "json",
        "--model-control-mode",
        "explicit",
        "--grpc-port",
        str(grpc_port),
        env={"FPET_ADMIN_KEY": "k"},
    )
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            client.infer("backbone", [grpc_image_input([jpeg()])], headers={"x-request-id": "req-grpc"})
        ok = httpx.post(
            f"{base}/classify?model=backbone",
            content=jpeg(),
            headers={"Content-Type": "image/jpeg", "X-Request-Id": "req-ok"},
        )
        bad = httpx.post(
            f"{base}/classify", content=b"x", headers={"Content-Type": "text/plain", "X-Request-Id": "req-bad"}
        )
        assert (ok.status_code, bad.status_code) == (200, 415)
        failed = httpx.post(
            f"{base}/v2/repository/models/fpet/load",
            headers={"Authorization": "Bearer k"},
            json={"parameters": {"uri": str(tmp_path / "missing")}},
        )
        assert failed.status_code == 400
    finally:
        process.terminate()
        process.wait(30)
    lines = [line for line in (tmp_path.glob("serve-*.log").__next__()).read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    access = {r["request_id"]: r for r in records if r["logger"] == "fpet.access"}
    good = access["req-ok"]
    assert good["route"] == "/classify" and good["model"] == "backbone" and good["task"] is None
    assert good["status"] == 200 and good["bytes"] > 0 and good["client"].startswith("127.0.0.1:")
    assert {"decode", "preprocess", "queue", "inference", "postprocess"} <= set(good["stages_ms"])
    assert access["req-bad"]["status"] == 415 and access["req-bad"]["model"] == "fpet"
    call = access["req-grpc"]  # a gRPC call is recorded as a request is
    assert call["method"] == "gRPC" and call["route"] == "/inference.GRPCInferenceService/ModelInfer"
    assert call["status"] == "OK" and call["model"] == "backbone" and "inference" in call["stages_ms"]
    assert any(r["level"] == "error" and "load of" in r["message"] for r in records)  # errors as JSON too
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own records are JSON as well


class Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint: decodes each export as the collector would."""

    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        Receiver.received.append((self.path, self.headers["Content-Type"], request))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_spans_reach_an_otlp_receiver_in_the_callers_trace(tiny_bundles):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    settings = Settings(
        bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])],
        providers="cpu",
        runtime="onnxruntime",
        otlp_endpoint=endpoint,
    )
    try:
        with TestClient(create_app(settings)) as client:
            answer = client.post(
                "/classify",
                content=jpeg(),
                headers={"Content-Type": "image/jpeg", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            )
            assert answer.status_code == 200
            assert client.get("/healthz").status_code == 200
        # leaving the client shuts the app down, which flushes the exporter
    finally:
        server.shutdown()
    assert Receiver.received and all(p == "/v1/traces" for p, _, _ in Receiver.received)
    assert all(t == "application/x-protobuf" for _, t, _ in Receiver.received)
    spans = [
        span
        for _, _, request in Receiver.received
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    resource = Receiver.received[0][2].resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "fpet"
    root = next(s for s in spans if s.name == "POST /classify")
    assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["fpet.model"].string_value == "fpet"
    assert attributes["http.response.status_code"].int_value == 200
    children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    assert set(children) == {"admission", "decode", "queue", "inference"}
    assert all(
        root.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano <= root.end_time_unix_nano
        for c in children.values()
    )
    assert children["queue"].end_time_unix_nano <= children["inference"].start_time_unix_nano + 1000
    assert any(s.name == "GET /healthz" and s.trace_id.hex() != TRACE_ID for s in spans)  # a new trace of its own
