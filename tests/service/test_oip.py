"""Open Inference Protocol inference, driven by `tritonclient.http` (a real client nobody here wrote) against a real
`fpet serve`, and the protocol codec's edge cases."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service import oip
from service.errors import ServiceError
from tests.helpers.images import IMAGES
from tests.helpers.oip import classify_probabilities, image_input, preprocess
from tests.helpers.servers import metric_value, start_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_bundles, tmp_path_factory):
    process, base = start_server(tiny_bundles, tmp_path_factory.mktemp("oip"), "--max-images", "8")
    yield base
    process.terminate()
    process.wait()


@pytest.fixture(scope="module")
def client(server):
    with httpclient.InferenceServerClient(server.removeprefix("http://")) as c:
        yield c


def pixel_input(pixels: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


@pytest.mark.parametrize("count", [1, 8])
@pytest.mark.parametrize("model", ["fpet", "backbone"])
def test_encoded_images_give_what_classify_gives(server, client, count, model):
    result = client.infer(model, [image_input(IMAGES[:count])])
    probabilities = result.as_numpy("probabilities")
    logits = result.as_numpy("logits")
    assert probabilities.shape == logits.shape == (count, 3)
    expected = np.array([classify_probabilities(server, image, model) for image in IMAGES[:count]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(oip.softmax(logits), probabilities, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("count", [1, 8])
def test_preprocessed_pixels_give_what_classify_gives(server, client, binary, count):
    meta = client.get_model_metadata("fpet")
    pixels = np.stack([preprocess(image, meta) for image in IMAGES[:count]])
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "logits")]
    result = client.infer("fpet", [pixel_input(pixels, binary)], outputs=outputs)
    expected = np.array([classify_probabilities(server, image) for image in IMAGES[:count]])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)


def test_classification_extension_returns_triton_strings(server, client):
    top2 = httpclient.InferRequestedOutput("probabilities", class_count=2)
    result = client.infer("fpet", [image_input(IMAGES[:3])], outputs=[top2])
    strings = result.as_numpy("probabilities")
    assert strings.shape == (3, 2)
    for row, image in zip(strings, IMAGES[:3], strict=True):
        expected = classify_probabilities(server, image)
        order = np.argsort(expected)[::-1][:2]
        parsed = [s.decode().split(":") for s in row]
        assert [int(p[1]) for p in parsed] == list(order)
        assert [p[2] for p in parsed] == [["a", "b", "c"][i] for i in order]
        assert [float(p[0]) for p in parsed] == pytest.approx([expected[i] for i in order], abs=1e-5)


def test_metadata_version_and_request_id(client):
    meta = client.get_model_metadata("fpet")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixel_values": "FP32"}
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "logits"}
    assert client.get_server_metadata()["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "statistics",
    ]
    assert client.is_server_live() and client.is_model_ready("fpet")
    version = meta["versions"][0]
    result = client.infer("fpet", [image_input(IMAGES[:1])], model_version=version, request_id="req-42")
    assert result.get_response()["id"] == "req-42" and result.get_response()["model_version"] == version
    with pytest.raises(InferenceServerException, match="no version"):
        client.infer("fpet", [image_input(IMAGES[:1])], model_version="0000")


def test_client_errors_are_clear(client, server):
    wrong_type = httpclient.InferInput("image", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException, match="must have datatype BYTES") as raised:
        client.infer("fpet", [wrong_type])
    assert raised.value.status() == "400"
    size = client.get_model_metadata("fpet")["preprocessing"]["img_size"]
    with pytest.raises(InferenceServerException, match=rf"must have shape \[N, 3, {size}, {size}\]"):
        client.infer("fpet", [pixel_input(np.zeros((1, 3, size + 1, size), dtype=np.float32))])
    with pytest.raises(InferenceServerException, match="no model 'nope'") as raised:
        client.infer("nope", [image_input(IMAGES[:1])])
    assert raised.value.status() == "404"
    with pytest.raises(InferenceServerException, match="not a JPEG, PNG or WebP image"):
        client.infer("fpet", [image_input([b"not an image"])])
    with pytest.raises(InferenceServerException, match="over the limit of 8"):
        client.infer("fpet", [image_input(IMAGES + IMAGES[:1])])
    malformed = httpx.post(f"{server}/v2/models/fpet/infer", content=b"{not json")
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]


def test_infer_counts_in_the_same_metrics(server, client):
    def answered() -> float:
        return metric_value(httpx.get(f"{server}/metrics").text, 'fpet_requests_total{code="200",model="backbone"}')

    before = answered()
    client.infer("backbone", [image_input(IMAGES[:2])])
    assert answered() == before + 1


@pytest.mark.network
def test_the_default_model_answers_tritonclient_as_it_answers_classify(fetched, tmp_path, monkeypatch):
    from export.defaults import ensure_default_bundles

    monkeypatch.setenv("FPET_HOME", str(fetched[0]))
    process, base = start_server(ensure_default_bundles(log=lambda _: None), tmp_path)
    samples = sorted(ROOT.joinpath("samples").glob("*.png"))
    images = [path.read_bytes() for path in samples]
    try:
        with httpclient.InferenceServerClient(base.removeprefix("http://")) as c:
            meta = c.get_model_metadata("fpet")
            by_image = c.infer("fpet", [image_input(images)]).as_numpy("probabilities")
            pixels = np.stack([preprocess(image, meta) for image in images])
            by_pixels = c.infer("fpet", [pixel_input(pixels)]).as_numpy("probabilities")
        expected = np.array([classify_probabilities(base, image, classes=10) for image in images])
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert list(by_image.argmax(1)) == list(by_pixels.argmax(1)) == list(expected.argmax(1)) == [9, 7]
    assert [p.stem for p in samples] == ["ankle_boot", "sneaker"]  # Fashion-MNIST classes 9 and 7
    np.testing.assert_allclose(by_pixels, expected, atol=1e-5)


# ---- the codec alone ----


def request(inputs: list[dict], tail: bytes = b"", **extra) -> tuple[bytes, str | None]:
    head = json.dumps({"inputs": inputs, **extra}).encode()
    return head + tail, (str(len(head)) if tail else None)


def parse(body_and_length: tuple[bytes, str | None], img_size: int = 4) -> oip.InferRequest:
    return oip.parse_request(*body_and_length, img_size=img_size)


def test_json_pixels_nested_or_flat_are_the_same():
    values = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    flat = parse(
        request(
            [{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": values.reshape(-1).tolist()}]
        )
    )
    nested = parse(
        request([{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": values.tolist()}])
    )
    np.testing.assert_array_equal(flat.pixels, values)
    np.testing.assert_array_equal(nested.pixels, values)
    assert [o.name for o in flat.outputs] == ["probabilities", "logits"] and not flat.outputs[0].binary


@pytest.mark.parametrize(
    ("inputs", "tail", "message"),
    [
        ([], b"", "exactly one input"),
        ([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], b"", "unknown input"),
        ([{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}], b"", "carries 1 elements"),
        ([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}], b"", "not valid base64"),
        (
            [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}],
            struct.pack("<I", 9) + b"ab",
            "runs past",
        ),
        (
            [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}],
            b"abc",
            "does not match",
        ),
        ([{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": [1]}], b"", "must be an object"),
        ([{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [1.0] * 47}], b"", "carries 47"),
        ([{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": ["x"] * 48}], b"", "numbers"),
        (
            [{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [float("nan")] * 48}],
            b"",
            "NaN",
        ),
        ([{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP16", "data": [0.0] * 48}], b"", "FP32"),
        (
            [
                {
                    "name": "pixel_values",
                    "shape": [1, 3, 4, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ],
            b"\0" * 8,
            "8 bytes of binary data",
        ),
        ([{"name": "pixel_values", "shape": [2**62, 3, 4, 4], "datatype": "FP32", "data": [0.0]}], b"", "carries 1"),
        ([{"name": "image", "shape": "1", "datatype": "BYTES", "data": []}], b"", "shape"),
        (
            [{"name": "pixel_values", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [10**400] * 48}],
            b"",
            "float32's range",
        ),
    ],
)
def test_malformed_requests_are_400_with_a_reason(inputs, tail, message):
    with pytest.raises(ServiceError, match=message) as raised:
        parse(request(inputs, tail))
    assert raised.value.status == 400


def test_headers_outputs_and_ids_are_checked():
    ok = [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]
    for body, length, message in [
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', "999", "does not fit"),
        (*request(ok, outputs=[{"name": "scores"}]), "unknown output"),
        (*request(ok, outputs=[{"name": "logits", "parameters": {"classification": -1}}]), "non-negative"),
        (*request(ok, id=7), "`id` must be a string"),
        (json.dumps({"inputs": ok}).encode() + b"tail", str(len(json.dumps({"inputs": ok}))), "no input declares"),
        (b'{"inputs": []}', "\u00b2", "does not fit"),  # "²" passes str.isdigit, not int()
        (b'{"inputs": []}', "9" * 5000, "does not fit"),
        (b"[" * 100_000, None, "not valid JSON"),  # deep nesting: RecursionError inside json
        (b'{"x": ' + b"1" * 5000 + b"}", None, "not valid JSON"),  # past Python's integer digit limit
        (*request(ok, outputs=[{"name": "logits", "parameters": {"binary_data": "false"}}]), "true or false"),
        (*request(ok, parameters={"binary_data_output": 1}), "true or false"),
    ]:
        with pytest.raises(ServiceError, match=message):
            oip.parse_request(body, length, img_size=4)


def test_binary_response_layout_is_what_triton_clients_read():
    outputs = [
        {"name": "logits", "parameters": {"binary_data": True}},
        {"name": "probabilities", "parameters": {"classification": 1, "binary_data": True}},
    ]
    images = [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AA==", "AQ=="]}]
    parsed = parse(request(images, outputs=outputs, id="r1"))
    logits = np.array([[1.0, 3.0, 2.0], [0.5, 0.1, 0.2]], dtype=np.float32)
    body, headers = oip.encode_response(parsed, "fpet", "v1", logits, ["a", "b", "c"])
    length = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:length])
    assert head["id"] == "r1" and [o["name"] for o in head["outputs"]] == ["logits", "probabilities"]
    first = head["outputs"][0]["parameters"]["binary_data_size"]
    np.testing.assert_array_equal(np.frombuffer(body[length : length + first], "<f4").reshape(2, 3), logits)
    strings = oip.deserialize_bytes(body[length + first :], "test")
    assert [s.decode().split(":")[1:] for s in strings] == [["1", "b"], ["0", "a"]]
