"""`fpet serve` as a real uvicorn process on a free loopback port: concurrent load, /metrics, SIGTERM drain,
several workers, and a schemathesis run against the service's own OpenAPI schema."""

import concurrent.futures
import shutil
import signal
import socket
import time

import httpx
import pytest
from PIL import Image

from tests.helpers.images import encode, jpeg
from tests.helpers.servers import classify, free_port, metric_value, start_server


@pytest.fixture(scope="module")
def server(tiny_bundles, tmp_path_factory):
    process, base = start_server(tiny_bundles, tmp_path_factory.mktemp("e2e"))
    yield base
    process.kill()
    process.wait()


def test_concurrent_requests_move_the_histograms(server):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: classify(server, ("fpet", "backbone")[i % 2]), range(40)))
    assert codes == [200] * 40
    text = httpx.get(f"{server}/metrics").text
    for model in ("fpet", "backbone"):
        assert metric_value(text, f'fpet_request_duration_seconds_count{{model="{model}"') >= 20
        assert metric_value(text, f'fpet_batch_inference_duration_seconds_count{{model="{model}"') >= 1
        assert metric_value(text, f'fpet_images_total{{model="{model}"}}') == 20
        # every image went through exactly one batch, and every batch was counted once
        assert metric_value(text, f'fpet_batch_size_sum{{model="{model}"}}') == 20
        assert metric_value(text, f'fpet_batch_size_count{{model="{model}"}}') == metric_value(
            text, f'fpet_batches_total{{model="{model}"}}'
        )


def test_schemathesis_finds_no_server_error_and_keeps_to_the_schema(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    cases = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            response = case.call(timeout=30)
            cases.append(response.status_code)
            case.validate_response(response, checks=checks)

        check()
    assert len(cases) >= 200


CLIENTS = 16


def test_sigterm_answers_every_request_sent_or_refuses_its_connection(tiny_bundles, tmp_path):
    """Keep-alive clients in a loop, SIGTERM mid-load: every request is answered (200, or 503 while draining) or
    its connection is refused before the server accepted it; none is dropped on an open connection."""
    process, base = start_server(tiny_bundles, tmp_path, "--max-delay-ms", "5")
    outcomes = []

    def client_loop():
        with httpx.Client(timeout=30) as session:
            for _ in range(2000):
                try:
                    response = session.post(f"{base}/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
                    outcomes.append(response.status_code)
                except httpx.ConnectError:
                    outcomes.append("refused")  # never accepted: the listener was closed
                    return
                except httpx.TransportError as exc:
                    outcomes.append(f"dropped: {exc!r}")
                    return

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client_loop) for _ in range(CLIENTS)]
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        concurrent.futures.wait(futures)
    assert process.wait(timeout=60) == 0  # a clean drain exits 0 (uvicorn re-raises the signal; fpet serve exits)
    log = "".join(p.read_text() for p in tmp_path.glob("serve-*.log"))
    assert "Application shutdown complete" in log
    assert outcomes.count(200) > 10 and outcomes.count("refused") == CLIENTS, outcomes[-20:]
    assert not [o for o in outcomes if o not in (200, 503, "refused")], [o for o in outcomes if o not in (200, 503)]
    for code in (200, 503):  # and every answer the server sent arrived
        assert outcomes.count(code) == log.count(f'"POST /classify HTTP/1.1" {code}'), (code, outcomes)


def test_several_workers_share_one_metrics_view(tiny_bundles, tmp_path):
    process, base = start_server(
        tiny_bundles, tmp_path, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    )
    try:
        for _ in range(20):  # new connections spread over both workers
            assert classify(base) == 200
        text = httpx.get(f"{base}/metrics").text
        assert metric_value(text, 'fpet_requests_total{code="200",model="fpet"}') == 20
        assert metric_value(text, 'fpet_request_duration_seconds_count{model="fpet"') == 20
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_http_benchmark_drives_wrk_and_hey(server, tmp_path):
    """Each native client and the in-process one: every case completes with 200s only, in alternating order, with
    the server's CPU per request read from its metrics."""
    from bench.http import bench_http, markdown, summary

    image = tmp_path / "x.png"
    image.write_bytes(encode(Image.new("RGB", (20, 20)), "PNG"))
    for client in ("wrk", "hey", "python"):
        if client != "python" and shutil.which(client) is None:
            pytest.skip(f"{client} is not installed (apt-get install {client})")
        rows = bench_http(server, [image], [1, 2], 1.0, ["backbone", "fpet"], client=client, repeats=2)
        assert [(r["model"], r["concurrency"], len(r["rounds"])) for r in rows] == [
            ("backbone", 1, 2),
            ("fpet", 1, 2),
            ("backbone", 2, 2),
            ("fpet", 2, 2),
        ]
        assert all(r["ok"] > 0 and r["ok"] == r["requests"] and not r["errors"] for r in rows), (client, rows)
        assert all(r["server_cpu_ms_per_request"] > 0 for r in rows)
        assert "| classify | fpet | 2 |" in markdown(rows)
        assert "classify at 2: fpet/backbone goodput" in summary(rows) and "(rounds: " in summary(rows)
    rows = bench_http(server, [image], [1], 1.0, ["fpet"], ("classify", "oip-image", "oip-pixels"), client="wrk")
    assert [r["route"] for r in rows] == ["classify", "oip-image", "oip-pixels"]
    assert all(r["ok"] > 0 and not r["errors"] for r in rows), rows


def test_http_benchmark_counts_errors_by_status(server, tmp_path):
    from bench.http import bench_http

    broken = tmp_path / "x.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    for client in ("wrk", "hey"):
        [row] = bench_http(server, [broken], [1], 1.0, ["fpet"], client=client)
        assert row["ok"] == 0 and row["errors"] == {"400": row["requests"]} and row["requests"] > 0, (client, row)


def test_hey_counts_connections_that_got_no_answer(tmp_path):
    """hey's CSV lists only answered requests: refused connections must still count as errors."""
    from bench.http import Case, run_hey

    case = Case("classify", "fpet", f"http://127.0.0.1:{free_port()}/classify", [b"x"], {"Content-Type": "image/png"})
    result = run_hey(case, 2, 1.0, tmp_path)
    assert result["ok"] == 0 and result["errors"].get("connect", 0) > 0 and result["requests"] > 0, result


def test_a_client_that_leaves_mid_body_counts_as_499_not_as_a_server_error(server):
    code = 'fpet_requests_total{code="%s",model="fpet"}'
    before = httpx.get(f"{server}/metrics").text
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\xff" * 1000
        )
        time.sleep(0.3)  # admitted and reading
    for _ in range(50):
        after = httpx.get(f"{server}/metrics").text
        if metric_value(after, code % "499") > metric_value(before, code % "499"):
            break
        time.sleep(0.1)
    assert metric_value(after, code % "499") - metric_value(before, code % "499") == 1
    assert metric_value(after, code % "500") == metric_value(before, code % "500")


def test_the_benchmark_waits_for_what_the_client_left_behind(server):
    """A request still in the server when the load generator stops is charged to its own case's CPU reading."""
    import threading

    from bench.http import settle

    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\nx")
    time.sleep(0.3)  # admitted, reading its body: in flight
    threading.Timer(0.8, sock.close).start()
    start = time.perf_counter()
    settle(server)
    assert 0.4 < time.perf_counter() - start < 10
