"""Triton's own tools against `fpet serve`: the model configuration and statistics extensions, and NVIDIA's
perf_analyzer (installed by `make tools`, bench/perf_analyzer.sh) driving a real server."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.images import IMAGES
from tests.helpers.oip import image_input
from tests.helpers.servers import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer"

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (a test extra)")


@pytest.fixture(scope="module")
def endpoints(tiny_bundles, tmp_path_factory):
    """The server's HTTP base URL and gRPC address."""
    grpc_port = free_port()
    flags = (
        "--max-images",
        "8",
        "--max-batch-size",
        "4",
        "--max-delay-ms",
        "3",
        "--max-queue-images",
        "40",
        "--grpc-port",
        str(grpc_port),
    )
    process, base = start_server(tiny_bundles, tmp_path_factory.mktemp("tools"), *flags)
    yield {"http": base, "grpc": f"127.0.0.1:{grpc_port}"}
    process.terminate()
    process.wait()


@pytest.fixture(scope="module")
def server(endpoints):
    return endpoints["http"]


def stats(base: str, model: str = "fpet") -> dict:
    (entry,) = httpx.get(f"{base}/v2/models/{model}/stats").json()["model_stats"]
    return entry


def test_the_server_lists_the_extensions_and_describes_each_model_as_triton_does(server):
    assert {"model_configuration", "statistics"} <= set(httpx.get(f"{server}/v2").json()["extensions"])
    meta = httpx.get(f"{server}/v2/models/fpet").json()
    config = httpx.get(f"{server}/v2/models/fpet/config").json()
    assert config == httpx.get(f"{server}/v2/models/fpet/versions/1/config").json()
    assert config["name"] == "fpet" and config["max_batch_size"] == 8
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["image"]["data_type"] == "TYPE_STRING" and inputs["image"]["dims"] == [1]
    assert inputs["pixel_values"]["dims"] == [3, 64, 64] and all(i["optional"] for i in config["input"])
    assert {o["name"]: o["dims"] for o in config["output"]} == {"probabilities": [3], "logits": [3]}
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [4],
        "max_queue_delay_microseconds": 3000,
        "default_queue_policy": {"max_queue_size": 40},
    }
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] == 1
    assert meta["versions"] == ["1"] and len(meta["bundle_version"]) >= 8
    assert httpx.get(f"{server}/v2/models/backbone/config").json()["name"] == "backbone"
    assert httpx.get(f"{server}/v2/models/nope/config").status_code == 404
    assert httpx.get(f"{server}/v2/models/fpet/versions/7/config").status_code == 404


def test_statistics_count_what_was_served(server):
    before = stats(server)
    with httpclient.InferenceServerClient(server.removeprefix("http://")) as client:
        client.infer("fpet", [image_input(IMAGES[:3])])
        client.infer("fpet", [image_input(IMAGES[:1])])
    assert (
        httpx.post(
            f"{server}/classify?model=fpet", content=IMAGES[0], headers={"Content-Type": "image/png"}
        ).status_code
        == 200
    )
    assert httpx.post(f"{server}/v2/models/fpet/infer", content=b"{").status_code == 400
    after = stats(server)
    grew = {
        k: after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"]
        for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    }
    assert grew == {"success": 3, "fail": 1, "queue": 3, "compute_input": 3, "compute_infer": 3, "compute_output": 3}
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["execution_count"] > before["execution_count"]
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert after["version"] == "1" and after["last_inference"] >= before["last_inference"]
    every = httpx.get(f"{server}/v2/models/stats").json()["model_stats"]
    assert {s["name"] for s in every} == {"fpet", "backbone"}
    assert stats(server, "backbone")["inference_count"] == 0  # the other variant counts on its own
    assert httpx.get(f"{server}/v2/models/nope/stats").status_code == 404


def perf_analyzer(*args: str) -> str:
    binary = PERF_ANALYZER / "bin" / "perf_analyzer"
    if not binary.is_file():
        pytest.skip("perf_analyzer is not installed: run `make tools` (needs apt-get install libb64-0d)")
    env = {**os.environ, "LD_LIBRARY_PATH": str(PERF_ANALYZER / "lib")}
    # a fixed number of requests, no stabilisation: the test checks counting, not speed, on a shared machine
    done = subprocess.run(
        [str(binary), *args, "--request-count", "120"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def reported(output: str, label: str) -> int:
    """The last value perf_analyzer printed for `label` (the final, stable measurement)."""
    return int(re.findall(rf"{label}: (\d+)", output)[-1])


@pytest.mark.parametrize("protocol, batch", [("http", 1), ("http", 2), ("grpc", 1), ("grpc", 2)])
def test_perf_analyzer_measures_pixel_values_and_the_server_side_counts_agree(endpoints, tmp_path, protocol, batch):
    server = endpoints["http"]
    data = tmp_path / "pixels.json"
    pixels = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    data.write_text(
        json.dumps({"data": [{"pixel_values": {"content": pixels.ravel().tolist(), "shape": [3, 64, 64]}}]})
    )
    before = stats(server)
    address = server.removeprefix("http://") if protocol == "http" else endpoints["grpc"]
    output = perf_analyzer(
        "-m",
        "fpet",
        "-i",
        protocol,
        "-u",
        address,
        "-b",
        str(batch),
        "--input-data",
        str(data),
        "--concurrency-range",
        "2",
    )
    client, served = reported(output, "Request count"), reported(output, "Successful request count")
    assert abs(client - served) <= 2, output
    assert reported(output, "Inference count") == pytest.approx(served * batch, abs=2 * batch), output
    assert (
        stats(server)["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] >= served
    )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_sends_real_encoded_images(endpoints, tmp_path, protocol):
    server = endpoints["http"]
    address = server.removeprefix("http://") if protocol == "http" else endpoints["grpc"]
    data = tmp_path / "images.json"
    serialized = b"".join(struct.pack("<I", len(image)) + image for image in IMAGES[:1])
    data.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(serialized).decode(), "shape": [1]}}]}))
    before = stats(server)
    output = perf_analyzer("-m", "fpet", "-i", protocol, "-u", address, "--input-data", str(data))
    after = stats(server)
    assert reported(output, "Successful request count") > 0
    assert after["inference_stats"]["compute_input"]["ns"] > before["inference_stats"]["compute_input"]["ns"]
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"]
