"""The Open Inference Protocol over gRPC, driven by `tritonclient.grpc` and by hand-built messages against a real
`fpet serve --grpc-port`: the answers match /classify, and every malformed call gets its status code, never a
crash."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers.images import IMAGES
from tests.helpers.oip import classify_probabilities, grpc_image_input, preprocess
from tests.helpers.servers import free_port, start_server

SAMPLE = open("samples/ankle_boot.png", "rb").read()  # noqa: SIM115 (read once at import)


@pytest.fixture(scope="module")
def server(tiny_bundles, tmp_path_factory):
    port = free_port()
    process, base = start_server(
        tiny_bundles,
        tmp_path_factory.mktemp("grpc"),
        "--grpc-port",
        str(port),
        "--max-images",
        "4",
        "--max-bytes",
        "200000",
    )
    yield base, f"127.0.0.1:{port}"
    process.terminate()
    process.wait()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server[1]) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_health_metadata_config_and_statistics(server, client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fpet")
    assert not client.is_model_ready("fpet", "7")
    assert {"model_configuration", "statistics"} <= set(client.get_server_metadata().extensions)
    meta = client.get_model_metadata("fpet")
    assert list(meta.versions) == ["1"] and [i.name for i in meta.inputs] == ["image", "pixel_values"]
    config = client.get_model_config("fpet").config
    assert config.max_batch_size == 4 and list(config.input[1].dims) == [3, 64, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    with grpc.insecure_channel(server[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    before = client.get_inference_statistics("fpet").model_stats[0]
    client.infer("fpet", [grpc_image_input(IMAGES[:2])])
    after = client.get_inference_statistics("fpet").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2
    names = {s.name for s in client.get_inference_statistics().model_stats}
    assert names == {"fpet", "backbone"}
    assert {m.name for m in client.get_model_repository_index().models} == {"fpet", "backbone"}


@pytest.mark.parametrize("model", ["fpet", "backbone"])
def test_the_sample_gets_the_same_top_1_and_probabilities_as_classify(server, client, model):
    base, _ = server
    expected = classify_probabilities(base, SAMPLE, model)
    result = client.infer(
        model, [grpc_image_input([SAMPLE])], outputs=[grpcclient.InferRequestedOutput("probabilities")]
    )
    got = result.as_numpy("probabilities")[0]
    assert int(np.argmax(got)) == int(np.argmax(expected))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    top = client.infer(
        model, [grpc_image_input([SAMPLE])], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=2)]
    )
    first = top.as_numpy("probabilities")[0][0].decode().split(":")
    assert int(first[1]) == int(np.argmax(expected))
    assert top.get_response().model_version == "1"


def test_pixel_values_as_raw_and_as_typed_contents_answer_alike(server, client, stub):
    base, _ = server
    meta = httpx.get(f"{base}/models/fpet").json()
    pixels = np.stack([preprocess(image, meta) for image in IMAGES[:2]])
    tensor = grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    raw = client.infer("fpet", [tensor]).as_numpy("logits")
    typed = service_pb2.ModelInferRequest(model_name="fpet", id="typed-1")
    typed.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape)).contents.fp32_contents.extend(
        pixels.ravel().tolist()
    )
    answer = stub.ModelInfer(typed)
    assert answer.id == "typed-1" and [o.name for o in answer.outputs] == ["probabilities", "logits"]
    logits = np.frombuffer(answer.raw_output_contents[1], dtype="<f4").reshape(2, -1)
    np.testing.assert_allclose(logits, raw, atol=1e-5)
    by_bytes = service_pb2.ModelInferRequest(model_name="fpet")
    by_bytes.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(IMAGES[0])
    assert len(stub.ModelInfer(by_bytes).raw_output_contents) == 2


def request(**tensor) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="fpet")
    if tensor:
        contents = tensor.pop("contents", None)
        entry = message.inputs.add(**tensor)
        if contents is not None:
            entry.contents.bytes_contents.extend(contents)
    return message


def with_outputs(message: service_pb2.ModelInferRequest, name: str, k: int) -> service_pb2.ModelInferRequest:
    message.outputs.add(name=name).parameters["classification"].int64_param = k
    return message


MALFORMED = {
    "no input": (request(), grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
    "unknown input": (
        request(name="x", datatype="BYTES", shape=[1], contents=[b"a"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown input",
    ),
    "image not BYTES": (
        request(name="image", datatype="FP32", shape=[1]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype BYTES",
    ),
    "shape and count differ": (
        request(name="image", datatype="BYTES", shape=[2], contents=[IMAGES[0]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "carries 1 elements",
    ),
    "negative shape": (
        request(name="image", datatype="BYTES", shape=[-1], contents=[IMAGES[0]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "non-negative",
    ),
    "not an image": (
        request(name="image", datatype="BYTES", shape=[1], contents=[b"not a picture"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image",
    ),
    "too many images": (
        request(name="image", datatype="BYTES", shape=[5], contents=IMAGES[:5]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "over the limit of 4",
    ),
    "pixels of the wrong size": (
        request(name="pixel_values", datatype="FP32", shape=[1, 3, 8, 8]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must have shape [N, 3, 64, 64]",
    ),
    "unknown output": (
        with_outputs(request(name="image", datatype="BYTES", shape=[1], contents=[IMAGES[0]]), "z", 0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown output",
    ),
    "negative top-k": (
        with_outputs(request(name="image", datatype="BYTES", shape=[1], contents=[IMAGES[0]]), "logits", -2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "non-negative",
    ),
    "over the size limit": (
        request(name="image", datatype="BYTES", shape=[1], contents=[b"x" * 300_000]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_calls_get_their_status_code_and_the_server_goes_on(stub, client, case):
    message, code, text = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(message)
    assert error.value.code() == code and text in error.value.details()
    assert client.is_server_ready()


def test_unknown_models_and_versions_are_not_found(stub, client):
    for message in (
        service_pb2.ModelInferRequest(model_name="nope"),
        service_pb2.ModelInferRequest(model_name="fpet", model_version="9"),
    ):
        message.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(IMAGES[0])
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(message)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    for call in (
        lambda: client.get_model_config("nope"),
        lambda: client.get_inference_statistics("nope"),
        lambda: client.get_model_metadata("nope"),
    ):
        with pytest.raises(InferenceServerException, match="NOT_FOUND"):
            call()
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
        client.load_model("fpet")


def test_an_api_key_is_asked_of_grpc_calls_too(tiny_bundles, tmp_path):
    port = free_port()
    process, _ = start_server(tiny_bundles, tmp_path, "--grpc-port", str(port), env={"FPET_API_KEY": "sesame"})
    try:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
                c.infer("fpet", [grpc_image_input(IMAGES[:1])])
            answer = c.infer("fpet", [grpc_image_input(IMAGES[:1])], headers={"authorization": "Bearer sesame"})
            assert answer.as_numpy("probabilities").shape == (1, 3)
    finally:
        process.terminate()
        process.wait()


def test_grpc_with_several_workers_is_a_one_line_error():
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--workers", "2", "--grpc-port", "8001"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "fpet: error: gRPC is served by one process: use --workers 1 with --grpc-port (FPET_GRPC_PORT), and scale "
        "with replicas"
    ]


def big_png(seed: int) -> bytes:
    """A 2000x2000 gradient: small to send, slow to decode, so a call is still running a moment later."""
    ramp = np.linspace(0, 255, 2000, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (2000, 1)), np.full((2000, 2000), seed * 40.0)], -1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_sigterm_answers_the_grpc_calls_in_progress_then_stops_and_exits_cleanly(tiny_bundles, tmp_path):
    port = free_port()
    process, _ = start_server(tiny_bundles, tmp_path, "--grpc-port", str(port))
    answers: list = []
    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        c.infer("fpet", [grpc_image_input(IMAGES[:1])])  # the channel is connected before the clock starts
        for seed in range(3):
            images = [big_png(seed)] * 4
            c.async_infer("fpet", [grpc_image_input(images)], callback=lambda result, error: answers.append(error))
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    # a call the server had taken is answered; one that came after the signal is refused as UNAVAILABLE (the client
    # knows it was not run); none is cut off
    outcomes = ["ok" if e is None else f"{e.status()} {e.message()}" for e in answers]
    refused = "StatusCode.UNAVAILABLE the server is shutting down"
    assert len(outcomes) == 3 and set(outcomes) <= {"ok", refused} and "ok" in outcomes, outcomes
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
