"""The Open Inference Protocol (KServe v2) as the service speaks it: parsing an inference request, in JSON or with
Triton's binary tensor data extension, and encoding the answer, with Triton's classification extension.

Pure functions over bytes and numpy, so the routes stay thin. Every malformed request is a `ServiceError` (400)
whose message names the input and what was expected; `tritonclient` shows that message to its user.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from service.errors import ServiceError

IMAGE, PIXELS = "image", "pixel_values"
LOGITS, PROBABILITIES = "logits", "probabilities"
OUTPUTS = (PROBABILITIES, LOGITS)
NUMERIC = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
HEADER_LENGTH = "inference-header-content-length"
# Every served model is version 1 to the protocol, as in the Triton repository `fpet export --format triton` writes:
# Triton's tools read versions as integers (perf_analyzer parses them with stoll). The bundle's own content version
# is `bundle_version` in the metadata.
VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]


def bad(message: str) -> ServiceError:
    return ServiceError(400, "invalid_request", message)


@dataclass(frozen=True)
class Requested:
    """One output the client asked for: whether it wants it as binary data, and top-k classification strings."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes] | None  # `image`: encoded files
    pixels: np.ndarray | None  # `pixel_values`: [N, 3, H, W]
    outputs: list[Requested]

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.pixels)


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tail (empty without the binary extension)."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not re.fullmatch(r"[0-9]{1,18}", header_length) or int(header_length) > len(body):
            raise bad(f"Inference-Header-Content-Length {header_length[:40]!r} does not fit a {len(body)}-byte body")
        head, tail = body[: int(header_length)], body[int(header_length) :]
    try:
        payload = json.loads(head)
    except (ValueError, RecursionError):  # also integers past Python's digit limit, and deep nesting
        raise bad("the inference request is not valid JSON") from None
    if not isinstance(payload, dict):
        raise bad("the inference request must be a JSON object")
    return payload, tail


def deserialize_bytes(buffer: bytes, what: str) -> list[bytes]:
    """Triton's BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise bad(f"{what}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + size > len(buffer):
            raise bad(f"{what}: a BYTES element runs past the binary data")
        items.append(buffer[offset : offset + size])
        offset += size
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def flat_json(data: object, what: str) -> list:
    """Row-major elements of `data`, flat or nested lists."""
    if not isinstance(data, list):
        raise bad(f"{what}: `data` must be a list")
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def parameters(obj: dict, what: str) -> dict:
    found = obj.get("parameters")
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise bad(f"{what}: `parameters` must be an object")
    return found


def parse_shape(tensor: dict, what: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"{what}: `shape` must be a list of non-negative integers")
    return shape


def read_images(tensor: dict, binary: bytes | None) -> list[bytes]:
    what = f"input {IMAGE!r}"
    if tensor.get("datatype") != "BYTES":
        raise bad(f"{what} must have datatype BYTES (encoded JPEG, PNG or WebP files), got {tensor.get('datatype')!r}")
    shape = parse_shape(tensor, what)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise bad(f"{what} must have shape [N] or [N, 1] with N >= 1, got {shape}")
    if binary is not None:
        items = deserialize_bytes(binary, what)
    else:
        items = []
        for element in flat_json(tensor.get("data"), what):
            if not isinstance(element, str):
                raise bad(f"{what}: JSON elements must be base64 strings")
            try:
                items.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError):
                raise bad(f"{what}: an element is not valid base64") from None
    if len(items) != shape[0]:
        raise bad(f"{what} has shape {shape} but carries {len(items)} elements")
    return items


def read_pixels(tensor: dict, binary: bytes | None, img_size: int) -> np.ndarray:
    what = f"input {PIXELS!r}"
    datatype = tensor.get("datatype")
    if datatype not in NUMERIC or (datatype == "FP16" and binary is None):
        raise bad(f"{what} must have datatype FP32 (or FP16 as binary data), got {datatype!r}")
    shape = parse_shape(tensor, what)
    expected = [3, img_size, img_size]
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise bad(f"{what} must have shape [N, {', '.join(map(str, expected))}], got {shape}")
    count = math.prod(shape)
    if binary is not None:
        if len(binary) != count * NUMERIC[datatype].itemsize:
            raise bad(f"{what}: {len(binary)} bytes of binary data for shape {shape} and {datatype}")
        values = np.frombuffer(binary, dtype=NUMERIC[datatype])
    else:
        try:
            values = np.asarray(flat_json(tensor.get("data"), what), dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise bad(f"{what}: JSON elements must be numbers within float32's range") from None
        if values.size != count:
            raise bad(f"{what} has shape {shape} but carries {values.size} elements")
    if not np.isfinite(values).all():
        raise bad(f"{what} has NaN or infinite values")
    return values.astype(np.float32).reshape(shape)


def flag(given: dict, key: str, default: bool, what: str) -> bool:
    """A JSON true or false: a string such as "false" is an error, not a true value."""
    value = given.get(key, default)
    if not isinstance(value, bool):
        raise bad(f"{what}: `{key}` must be true or false, not {value!r}")
    return value


def read_outputs(payload: dict) -> list[Requested]:
    binary_default = flag(parameters(payload, "the request"), "binary_data_output", False, "the request")
    asked = payload.get("outputs")
    if asked is None:
        return [Requested(name, binary_default) for name in OUTPUTS]
    if not isinstance(asked, list) or not asked:
        raise bad("`outputs` must be a non-empty list")
    outputs = []
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUTS:
            raise bad(f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        given = parameters(item, f"output {name!r}")
        k = given.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad(f"output {name!r}: `classification` must be a non-negative integer")
        outputs.append(Requested(name, flag(given, "binary_data", binary_default, f"output {name!r}"), k))
    return outputs


def parse_request(body: bytes, header_length: str | None, img_size: int) -> InferRequest:
    payload, tail = split_body(body, header_length)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"give exactly one input: {IMAGE!r} (BYTES, encoded images) or {PIXELS!r} (FP32, preprocessed)")
    tensor = inputs[0]
    size = parameters(tensor, "the input").get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size != len(tail)):
        raise bad(f"binary_data_size {size!r} does not match the {len(tail)} bytes after the JSON header")
    if size is None and tail:
        raise bad("binary data follows the JSON header but no input declares binary_data_size")
    binary = tail if size is not None else None
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("`id` must be a string")
    name = tensor.get("name")
    if name == IMAGE:
        return InferRequest(request_id, read_images(tensor, binary), None, read_outputs(payload))
    if name == PIXELS:
        return InferRequest(request_id, None, read_pixels(tensor, binary, img_size), read_outputs(payload))
    raise bad(f"unknown input {name!r}; inputs: {IMAGE!r} (BYTES) or {PIXELS!r} (FP32)")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def classification(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Top-k per row as Triton writes them: `"<value>:<index>:<label>"`."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    rows = [[f"{values[r, i]:f}:{i}:{labels[i]}".encode() for i in row] for r, row in enumerate(order)]
    return np.array(rows, dtype=object)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes  # as binary data (HTTP's extension, gRPC's raw_output_contents)
    values: list  # as JSON data


def output_tensors(request: InferRequest, logits: np.ndarray, labels: list[str]) -> list[OutputTensor]:
    """The outputs the request asked for, in its order: scores, or their top-k as Triton's classification strings."""
    tensors = {LOGITS: logits.astype(np.float32), PROBABILITIES: softmax(logits.astype(np.float32))}
    outputs = []
    for want in request.outputs:
        values = tensors[want.name]
        if want.classification:
            top = classification(values, min(want.classification, values.shape[1]), labels)
            flat = list(top.reshape(-1))
            outputs.append(
                OutputTensor(want.name, "BYTES", list(top.shape), serialize_bytes(flat), [b.decode() for b in flat])
            )
        else:
            outputs.append(
                OutputTensor(
                    want.name, "FP32", list(values.shape), values.astype("<f4").tobytes(), values.reshape(-1).tolist()
                )
            )
    return outputs


def encode_response(
    request: InferRequest, model: str, version: str, logits: np.ndarray, labels: list[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; binary outputs follow the JSON header in the order listed."""
    outputs, tail = [], []
    for want, tensor in zip(request.outputs, output_tensors(request, logits, labels), strict=True):
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if want.binary:
            entry["parameters"] = {"binary_data_size": len(tensor.raw)}
            tail.append(tensor.raw)
        else:
            entry["data"] = tensor.values
        outputs.append(entry)
    head: dict = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not tail:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + b"".join(tail), headers
