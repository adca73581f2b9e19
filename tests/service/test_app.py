"""Every endpoint and error of the API, through the ASGI app, on tiny exported bundles."""

import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.helpers.images import encode, jpeg, png_bomb

PROVIDERS = {"onnxruntime": "CPUExecutionProvider", "openvino": "OpenVINO CPU"}


@pytest.fixture(scope="module", params=list(PROVIDERS))
def client(request, tiny_bundles):
    """The whole API on each runtime: onnxruntime, and OpenVINO in its default precision on this CPU."""
    settings = Settings(
        bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])],
        providers="cpu",
        runtime=request.param,
        max_batch_size=4,
        max_images=3,
        max_bytes=200_000,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.runtime = request.param
        yield client


def check_error(response, status, error_type):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type and body["error"] and body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_raw_body_classify(client):
    response = client.post("/classify?top_k=3", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "fpet" and body["execution_provider"] == PROVIDERS[client.runtime]
    assert len(body["predictions"]) == 3 and {p["label"] for p in body["predictions"]} <= {"a", "b", "c"}
    assert body["predictions"][0]["score"] >= body["predictions"][1]["score"]
    assert set(body["timing_ms"]) == {"decode", "preprocess", "queue", "inference", "postprocess", "total"}
    assert response.headers["x-request-id"] == body["request_id"]
    assert "inference;dur=" in response.headers["server-timing"]


def test_multipart_json_and_model_in_path(client):
    multipart = client.post("/classify?model=backbone", files={"file": ("x.jpg", jpeg(), "image/jpeg")})
    assert multipart.status_code == 200 and multipart.json()["model"] == "backbone"
    one = client.post("/models/fpet/classify", json={"image_b64": base64.b64encode(jpeg()).decode()})
    assert one.status_code == 200 and len(one.json()["results"]) == 1
    images = [{"b64": base64.b64encode(jpeg(c)).decode()} for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    many = client.post("/classify", json={"images": images})
    assert many.status_code == 200 and [r["image"] for r in many.json()["results"]] == [0, 1, 2]
    assert client.post("/classify", headers={"X-Request-Id": "abc-123"}, content=jpeg()).status_code == 415


def test_same_answer_as_pytorch_through_the_same_preprocessing(client, tiny_bundles):
    from export.bundle import read_manifest
    from training.checkpoint import load_run
    from training.data import Preprocessing

    manifest = read_manifest(tiny_bundles["fpet"])
    model, config = load_run(manifest["source_run"]["path"])
    image = Image.new("RGB", (80, 50))
    image.putdata([(x * 3 % 256, y * 5 % 256, (x + y) % 256) for y in range(50) for x in range(80)])
    png = encode(image, "PNG")
    pre = Preprocessing.from_dict(config["preprocessing"])
    with torch.no_grad():
        logits = model(pre.to_input(torch.from_numpy(pre.resize_image(image).copy())[None]))[0]
    expected = torch.softmax(logits, -1).numpy()
    body = client.post("/classify", content=png, headers={"Content-Type": "image/png"}).json()
    low = client.get("/models/fpet").json()["compute_precision"] == "bf16"  # 8 bits of mantissa, not 24
    for p in body["predictions"]:
        assert p["score"] == pytest.approx(float(expected[p["index"]]), abs=1e-2 if low else 1e-4)


def test_compare_runs_every_variant_on_the_same_image_and_is_counted(client):
    answered = 'fpet_requests_total{code="200",model="compare"}'
    refused = 'fpet_request_errors_total{model="compare",reason="invalid_image"}'
    before = client.get("/metrics").text
    body = client.post("/classify/compare", content=jpeg(), headers={"Content-Type": "image/jpeg"}).json()
    assert set(body["models"]) == {"fpet", "backbone"}
    assert isinstance(body["top1_agreement"], bool) and body["speedup"] > 0
    assert body["models"]["fpet"]["inference_ms_per_image"] > 0
    bad = client.post("/classify/compare", content=b"not an image", headers={"Content-Type": "image/jpeg"})
    assert bad.status_code == 400
    after = client.get("/metrics").text
    assert metric(after, answered) == metric(before, answered) + 1
    assert metric(after, refused) == metric(before, refused) + 1
    assert 'fpet_request_duration_seconds_count{model="compare"' in after


def test_health_and_metadata(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/readyz").status_code == 200 and client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/fpet/ready").json() == {"name": "fpet", "ready": True}
    meta = client.get("/models/fpet").json()
    assert meta == client.get("/v2/models/fpet").json()
    assert meta["schedule"] == "6:0.5" and meta["tokens_per_block"][7] == 9 and meta["gflops_per_image"] > 0
    assert meta["execution_provider"] == PROVIDERS[client.runtime] and meta["batcher"]["max_batch_size"] == 4
    assert meta["runtime"] == client.runtime
    assert meta["platform"] == {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}[client.runtime]
    assert client.get("/models/backbone").json()["schedule"] == "none"
    assert client.get("/models/fpet/labels").json() == ["a", "b", "c"]
    assert [m["name"] for m in client.get("/models").json()["models"]] == ["fpet", "backbone"]
    info = client.get("/info").json()
    assert info["ready"] and set(info["models"]) == {"fpet", "backbone"}
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "application/json"} <= set(body)


def test_metrics_follow_the_conventions(client):
    client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    text = client.get("/metrics").text
    for name in (
        "fpet_requests_total",
        "fpet_request_duration_seconds_bucket",
        "fpet_stage_duration_seconds_bucket",
        "fpet_batch_inference_duration_seconds_bucket",
        "fpet_images_total",
        "fpet_batches_total",
        "fpet_batch_size_bucket",
        "fpet_queue_images",
        "fpet_requests_in_flight",
        "fpet_model_ready",
        "fpet_model_info",
        "fpet_model_gflops_per_image",
        "fpet_model_load_duration_seconds",
        "fpet_model_warmup_duration_seconds",
        "fpet_build_info",
    ):
        assert name in text, name
    assert 'le="0.0075"' in text and 'fpet_requests_total{code="200",model="fpet"}' in text


def raw_body(content: bytes, content_type: str) -> dict:
    return {"content": content, "headers": {"Content-Type": content_type}}


TINY_IMAGE = Image.new("RGB", (8, 8))


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error_type"),
    [
        (raw_body(b"", "image/jpeg"), 400, "invalid_request"),
        (raw_body(jpeg()[:300], "image/jpeg"), 400, "invalid_image"),
        (raw_body(b"plain text, called a JPEG", "image/jpeg"), 400, "invalid_image"),
        ({"json": {"image_b64": "***not base64***"}}, 400, "invalid_request"),
        (raw_body(b"{not json", "application/json"), 400, "invalid_request"),
        (raw_body(png_bomb(90_000, 90_000), "image/png"), 413, "payload_too_large"),
        (raw_body(b"\xff\xd8\xff" + b"0" * 300_000, "image/jpeg"), 413, "payload_too_large"),
        ({"json": {"images": [{"b64": "AAAA"}] * 4}}, 413, "payload_too_large"),
        (raw_body(encode(TINY_IMAGE, "GIF"), "image/gif"), 415, "unsupported_media_type"),
        (raw_body(encode(TINY_IMAGE, "TIFF"), "image/png"), 415, "unsupported_media_type"),
        (raw_body(b"hello", "text/plain"), 415, "unsupported_media_type"),
        ({"json": {"images": []}}, 422, "validation_error"),
        ({"json": {"images": "nope"}}, 422, "validation_error"),
    ],
)
def test_bad_requests(client, request_kwargs, status, error_type):
    check_error(client.post("/classify", **request_kwargs), status, error_type)


def test_grey_rgba_and_16_bit_images_are_accepted(client):
    for image in (
        Image.new("L", (30, 30), 90),
        Image.new("RGBA", (30, 30), (9, 8, 7, 6)),
        Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)),
    ):
        assert (
            client.post("/classify", content=encode(image, "PNG"), headers={"Content-Type": "image/png"}).status_code
            == 200
        )


def test_unknown_model_query_and_route_errors(client):
    check_error(
        client.post("/classify?model=resnet", content=jpeg(), headers={"Content-Type": "image/jpeg"}),
        404,
        "model_not_found",
    )
    assert 'model="resnet"' not in client.get("/metrics").text
    check_error(client.get("/models/resnet"), 404, "model_not_found")
    check_error(
        client.post("/classify?top_k=0", content=jpeg(), headers={"Content-Type": "image/jpeg"}),
        422,
        "validation_error",
    )
    check_error(client.get("/nowhere"), 404, "not_found")
    soon = {"Content-Type": "image/jpeg", "X-Request-Timeout-Ms": "soon"}
    check_error(client.post("/classify", content=jpeg(), headers=soon), 400, "invalid_request")


def test_a_request_past_its_deadline_gets_504(client):
    response = client.post(
        "/classify", content=jpeg(), headers={"Content-Type": "image/jpeg", "X-Request-Timeout-Ms": "0"}
    )
    check_error(response, 504, "timeout")


def test_api_key_and_queue_limits(tiny_bundles):
    settings = Settings(
        bundles=[str(tiny_bundles["fpet"])], providers="cpu", api_key="s3cret", max_queue_images=1, max_images=4
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = {"Content-Type": "image/jpeg"}
        check_error(client.post("/classify", content=jpeg(), headers=headers), 401, "unauthorized")
        check_error(
            client.post("/classify", content=jpeg(), headers={**headers, "X-API-Key": "wrong"}), 401, "unauthorized"
        )
        assert client.post("/classify", content=jpeg(), headers={**headers, "X-API-Key": "s3cret"}).status_code == 200
        ok = client.post("/classify", content=jpeg(), headers={**headers, "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/readyz").status_code == 200  # health and metadata need no key
        images = [{"b64": base64.b64encode(jpeg()).decode()}] * 2
        response = client.post("/classify", json={"images": images}, headers={"X-API-Key": "s3cret"})
        check_error(response, 429, "overloaded")  # two images never fit a queue of one
        assert response.headers["retry-after"] == "1"


def metric(text: str, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " "))


def test_a_full_queue_refuses_before_reading_or_decoding(tiny_bundles):
    """A queue of one, a model made slow: concurrent requests get 200 or 429, and a request that cannot be queued
    is refused even when its body is not an image (it was never read)."""
    import threading

    settings = Settings(
        bundles=[str(tiny_bundles["fpet"])], providers="cpu", max_queue_images=1, max_batch_size=1, admission_wait_ms=0
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        batcher = client.app.state.fpet.batchers["fpet"]
        run_batch = batcher.run_batch
        batcher.run_batch = lambda batch: (time.sleep(0.4), run_batch(batch))[1]
        codes = []
        overloaded = 'fpet_request_errors_total{model="fpet",reason="overloaded"}'
        before = metric(client.get("/metrics").text, overloaded)

        def send():
            codes.append(client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"}).status_code)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        garbage = client.post("/classify", content=b"not an image", headers={"Content-Type": "image/jpeg"})
        for thread in threads:
            thread.join()
        check_error(garbage, 429, "overloaded")
        assert garbage.headers["retry-after"] == "1"
        assert set(codes) == {200, 429} and 1 <= codes.count(200) <= 3, codes
        assert metric(client.get("/metrics").text, overloaded) - before == codes.count(429) + 1


def test_draining_answers_with_connection_close_and_refuses_new_work(tiny_bundles):
    from service import lifecycle

    settings = Settings(bundles=[str(tiny_bundles["fpet"])], providers="cpu")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        lifecycle.begin_drain()  # what the server does on SIGTERM, on the event loop
        ready = client.get("/readyz")
        check_error(ready, 503, "shutting_down")
        assert ready.headers["connection"] == "close"
        refused = client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        check_error(refused, 503, "shutting_down")
        assert refused.headers["connection"] == "close"
        assert 'fpet_model_ready{model="fpet"} 0.0' in client.get("/metrics").text


def test_not_ready_when_the_models_cannot_load(tmp_path):
    with TestClient(create_app(Settings(bundles=[str(tmp_path)], providers="cpu")), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        response = c.get("/readyz")
        check_error(response, 503, "not_ready")
        assert "not a model bundle" in response.json()["error"] and response.headers["retry-after"]
        body = {"content": jpeg(), "headers": {"Content-Type": "image/jpeg"}}
        for route in ("/classify", "/models/fpet/explain"):  # not a 404 "no model": nothing could load
            check_error(c.post(route, **body), 503, "not_ready")
        check_error(c.get("/v2/models/fpet/ready"), 503, "not_ready")
        check_error(c.post("/v2/models/fpet/infer", json={"inputs": []}), 503, "not_ready")
        assert "\nfpet_ready 0.0\n" in c.get("/metrics").text  # what FpetNotReady alerts on: no model series exist


def test_cuda_is_used_when_there_or_its_absence_blocks_readiness(tiny_bundles):
    """Holds on both kinds of machine: with CUDA the model runs there (IO binding) and is ready; without it the
    fallback is detected, counted and, as asked, keeps the service unready."""
    import onnxruntime

    settings = Settings(bundles=[str(tiny_bundles["fpet"])], providers="cuda", allow_cpu_fallback=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        meta = client.get("/models/fpet").json()
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            assert not meta["provider_fallback"] and meta["execution_provider"] == "CUDAExecutionProvider"
            assert client.get("/readyz").status_code == 200
            response = client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200, response.text
        else:
            assert meta["provider_fallback"] and meta["execution_provider"] == "CPUExecutionProvider"
            assert client.get("/readyz").status_code == 503
            assert "fpet_execution_provider_fallback_total" in client.get("/metrics").text


def test_io_binding_gives_the_same_logits(tiny_bundles):
    from service.runtime import ModelRunner

    runner = ModelRunner(tiny_bundles["fpet"], providers="cpu", runtime="onnxruntime")
    batch = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    plain = runner.run(batch)
    runner.io_binding = True  # what a CUDA session uses
    np.testing.assert_array_equal(runner.run(batch), plain)


def test_int8_bundles_are_served_and_say_so(tmp_path):
    from export.exporter import ExportOptions, export_bundle
    from tests.helpers.tiny import make_run

    run = make_run(tmp_path / "run")
    export_bundle(run, tmp_path / "int8", ExportOptions(precision="int8", formats=("onnx",)), log=lambda _: None)
    with TestClient(create_app(Settings(bundles=[str(tmp_path / "int8")], providers="cpu"))) as client:
        assert client.get("/models/fpet").json()["precision"] == "int8"
        response = client.post("/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200 and response.json()["model"] == "fpet"
        assert 'precision="int8"' in client.get("/metrics").text


def test_service_preprocessing_equals_training_preprocessing():
    from fpet.imaging import normalize, resize_rgb
    from training.data import Preprocessing

    image = Image.open(io.BytesIO(jpeg((12, 200, 99), (77, 31))))
    pre = Preprocessing(32, normalize="imagenet")
    d = pre.to_dict()
    ours = normalize(resize_rgb(image, 32)[None], d["mean"], d["std"])
    theirs = pre.to_input(torch.from_numpy(pre.resize_image(image).copy())[None]).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_api_docs_load_without_internet(client):
    """/docs references only the service's own Swagger UI files (no CDN), and they are served."""
    import re

    html = client.get("/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in (a for a in assets if a.startswith("/docs/assets/")):
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert "/docs/assets/swagger-ui-bundle.js" in assets and "/openapi.json" in assets
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert "isOAS31" in bundle  # a Swagger UI that renders the OpenAPI 3.1 document FastAPI writes


def photo_jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    """A camera-sized JPEG with smooth structure and noise (what draft decoding has to get right)."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1).astype(np.float64)
    rgb += np.random.default_rng(0).normal(0, 12, rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", [None, 6])
def test_large_jpegs_decode_small_and_identically_in_training_and_serving(tmp_path, orientation):
    """Draft decoding (1/8 of 1600x1200 is 200x150, at least 112) is shared: the service's pixels are the ones
    training's image loader produces, exactly."""
    from fpet.imaging import resize_rgb
    from service.decode import decode_image
    from training.data import Preprocessing, open_split

    data = photo_jpeg(1600, 1200, orientation)
    served = decode_image(data, 40_000_000, 112)
    assert served.size == ((150, 200) if orientation == 6 else (200, 150))  # decoded at 1/8 scale, then rotated
    serving = resize_rgb(served, 112)
    folder = tmp_path / "data" / "photo"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(data)
    split = open_split(tmp_path / "data", "train", classes=["photo"])
    training = split.decode([0], Preprocessing(112)).pixels[0].numpy()
    np.testing.assert_array_equal(serving, training)
    full = resize_rgb(Image.open(io.BytesIO(data)).convert("RGB"), 112)  # what decoding at full size would give
    assert np.abs(full.astype(int) - serving.astype(int)).mean() < 3  # the same picture, not a different one


@pytest.fixture
def fresh_client(tiny_bundles):
    settings = Settings(bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])], providers="cpu")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_explain_returns_the_plan_and_the_picture(fresh_client):
    client = fresh_client
    response = client.post("/models/fpet/explain?top_k=2", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    classified = client.post("/models/fpet/classify?top_k=2", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert [p["index"] for p in body["predictions"]] == [p["index"] for p in classified.json()["predictions"]]
    (point,) = body["merges"]
    assert point["block"] == 6 and point["tokens_before"] == 17 and point["tokens_after"] == 9
    assert len(point["groups"]) == 8 and sorted(i for group in point["groups"] for i in group) == list(range(16))
    assert body["grid"] == [4, 4]
    for kwargs in ({"params": {"format": "png"}}, {"headers": {"Accept": "image/png"}}):
        headers = {"Content-Type": "image/jpeg", **kwargs.get("headers", {})}
        picture = client.post("/models/fpet/explain", content=jpeg(), headers=headers, params=kwargs.get("params"))
        assert picture.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(picture.content)).size == (64 * 3, 64 * 3)
    backbone = client.post("/models/backbone/explain", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert backbone.status_code == 200 and backbone.json()["merges"] == [] and backbone.json()["grid"] is None
    check_error(
        client.post("/models/backbone/explain?format=png", content=jpeg(), headers={"Content-Type": "image/jpeg"}),
        400,
        "invalid_request",
    )
    check_error(
        client.post("/models/fpet/explain", content=b"nope", headers={"Content-Type": "image/jpeg"}),
        400,
        "invalid_image",
    )
    assert 'fpet_requests_total{code="200",model="explain"}' in client.get("/metrics").text
    schema = client.get("/openapi.json").json()["paths"]["/models/{model}/explain"]["post"]
    assert (
        "image/png" in schema["responses"]["200"]["content"]
        and "multipart/form-data" in schema["requestBody"]["content"]
    )


def test_explain_refuses_at_once_when_busy(fresh_client):
    import asyncio

    client = fresh_client
    state = client.app.state.fpet
    slots, state.explain_slots = state.explain_slots, asyncio.Semaphore(0)  # every slot taken
    try:
        response = client.post("/models/fpet/explain", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        check_error(response, 429, "overloaded")
        assert response.headers["retry-after"] == "1"
    finally:
        state.explain_slots = slots


def test_the_service_imports_no_torch():
    """The service images have no torch: the app and everything it imports must load without it."""
    import subprocess
    import sys

    code = "import sys, service.app, service.server; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_route_hops_to_a_thread_before_its_work():
    """FastAPI runs a plain-def endpoint or dependency in its thread pool: a thread hop and a wake-up on every request
    before any work (0.1 ms of the event loop's CPU per request, docs/benchmarks.md "AVX512-BF16")."""
    import importlib
    import inspect
    import pkgutil

    from fastapi.routing import APIRoute

    import service.routes

    def calls(dependant):
        for dependency in dependant.dependencies:
            yield dependency.call
            yield from calls(dependency)

    routes = [
        route
        for module in pkgutil.iter_modules(service.routes.__path__)
        for route in importlib.import_module(f"service.routes.{module.name}").router.routes
        if isinstance(route, APIRoute)
    ]
    assert any(route.path == "/classify" for route in routes)
    for route in routes:
        sync = [c.__name__ for c in (route.endpoint, *calls(route.dependant)) if not inspect.iscoroutinefunction(c)]
        assert not sync, f"{route.path} runs {sync} in the thread pool"


def test_recent_rate_counts_every_request_beyond_the_latency_sample():
    from service.recent import RecentLatencies

    recent = RecentLatencies(window=10.0, cap=5)
    for i in range(100):
        recent.observe("fpet", 0.01 * (i % 10 + 1), now=1000.0 + i * 0.05)  # 100 requests in 5 s
    summary = recent.summary(now=1005.0)["models"]["fpet"]
    assert summary["requests"] == 100 and summary["requests_per_s"] == 10.0
    assert 10 <= summary["p50_ms"] <= 100
    assert recent.summary(now=1100.0)["models"]["fpet"]["requests"] == 0  # the window moved on


@pytest.mark.parametrize("runtime", list(PROVIDERS))
def test_instances_split_the_cores_and_answer_as_one_instance_does(tiny_bundles, monkeypatch, runtime):
    import service.state

    monkeypatch.setattr(service.state, "available_cores", lambda: 4)
    settings = Settings(
        bundles=[str(tiny_bundles["fpet"])], providers="cpu", instances=2, max_batch_size=2, runtime=runtime
    )
    one = Settings(bundles=[str(tiny_bundles["fpet"])], providers="cpu", runtime=runtime)
    bodies = [jpeg((40 * i, 200 - 30 * i, 90)) for i in range(6)]

    def top(c, body):
        response = c.post("/classify", content=body, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        return [(p["index"], round(p["score"], 5)) for p in response.json()["predictions"]]

    with TestClient(create_app(settings)) as two:
        runner = two.app.state.fpet.runners["fpet"]
        if runtime == "onnxruntime":
            assert runner.session.get_session_options().intra_op_num_threads == 2  # 4 cores, 2 instances
        else:  # two streams (batches at once) on the four cores together (OpenVINO caps them at the machine's)
            compiled = runner.session.compiled
            assert compiled.get_property("NUM_STREAMS") == 2
            assert compiled.get_property("INFERENCE_NUM_THREADS") == min(4, os.cpu_count())
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda body: top(two, body), bodies))
        batches = metric(two.get("/metrics").text, 'fpet_batches_total{model="fpet"}')
    with TestClient(create_app(one)) as single:
        assert answers == [top(single, body) for body in bodies]
    assert batches >= 3  # six images in batches of at most two


def test_compare_leaves_no_work_behind_when_one_variant_fails(tiny_bundles):
    """The backbone's batch fails while fpet is still preprocessing: fpet's part must be cancelled, not go on to
    queue an image on the place the answered request gave back."""
    settings = Settings(bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])], providers="cpu")
    fpet_batches = []

    def broken(*inputs):
        raise RuntimeError("backbone broke")

    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        state = c.app.state.fpet
        slow_preprocess = state.runners["fpet"].preprocess

        def slow(image):
            time.sleep(0.3)
            return slow_preprocess(image)

        state.runners["fpet"].preprocess = slow
        fpet_run = state.batchers["fpet"].run_batch
        state.batchers["fpet"].run_batch = lambda *inputs: fpet_batches.append(len(inputs[0])) or fpet_run(*inputs)
        state.batchers["backbone"].run_batch = broken
        response = c.post("/classify/compare", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        time.sleep(0.6)  # fpet's preprocessing has long finished
        assert response.status_code == 500, response.text
        assert fpet_batches == [] and state.batchers["fpet"].idle


def test_bodies_that_break_the_parsers_are_400_and_counted_as_400(tiny_bundles):
    code = 'fpet_requests_total{code="%s",model="fpet"}'
    multiparts = (b"no boundary at all", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n")
    with TestClient(create_app(Settings(bundles=[str(tiny_bundles["fpet"])], providers="cpu"))) as c:
        before = c.get("/metrics").text
        for body in (b"[" * 100_000, b'{"image_b64": ' + b"1" * 5000 + b"}"):  # deep nesting; 5,000 digits
            response = c.post("/classify", content=body, headers={"Content-Type": "application/json"})
            check_error(response, 400, "invalid_request")
        for body in multiparts:
            response = c.post("/classify", content=body, headers={"Content-Type": "multipart/form-data"})
            check_error(response, 400, "invalid_request")
        after = c.get("/metrics").text
    assert metric(after, code % "400") - metric(before, code % "400") == 4
    assert metric(after, code % "500") == metric(before, code % "500")


def test_a_request_decodes_at_most_its_pixel_budget_counting_jpegs_at_their_decode_size(tiny_bundles):
    settings = Settings(bundles=[str(tiny_bundles["fpet"])], providers="cpu", max_request_pixels=100_000)
    small_file_big_pixels = base64.b64encode(encode(Image.new("RGB", (200, 200), (9, 9, 9)), "PNG")).decode()
    camera = base64.b64encode(encode(Image.new("RGB", (1000, 1000), (90, 9, 9)), "JPEG")).decode()
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        two = c.post("/classify", json={"images": [{"b64": small_file_big_pixels}] * 2})
        assert two.status_code == 200, two.text  # 80,000 pixels
        three = c.post("/classify", json={"images": [{"b64": small_file_big_pixels}] * 3})
        check_error(three, 413, "payload_too_large")  # 120,000: refused before the third is decoded
        assert "FPET_MAX_REQUEST_PIXELS" in three.json()["error"]
        jpegs = c.post("/classify", json={"images": [{"b64": camera}] * 3})  # 3 MP, but a JPEG decodes small
        assert jpegs.status_code == 200, jpegs.text
        late = c.post("/classify", json={"images": [{"b64": camera}] * 3}, headers={"X-Request-Timeout-Ms": "0.001"})
        check_error(late, 504, "timeout")
        assert "being decoded" in late.json()["error"]


def test_cores_are_the_cgroup_quota_not_the_nodes_count(tmp_path):
    from service.state import available_cores

    cpu_max = tmp_path / "cpu.max"
    everything = available_cores(tmp_path / "absent")
    cpu_max.write_text("150000 100000\n")  # a Kubernetes limit of 1.5 CPU
    assert available_cores(cpu_max) == min(2, everything)
    cpu_max.write_text("50000 100000\n")  # half a CPU: one decode thread, not one per core of the node
    assert available_cores(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == everything == len(os.sched_getaffinity(0))
