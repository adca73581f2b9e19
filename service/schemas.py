"""Request and response bodies, as the OpenAPI schema shows them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class B64Image(BaseModel):
    b64: str = Field(description="a base64-encoded JPEG, PNG or WebP image")


class JsonRequest(BaseModel):
    """Either one image (`image_b64`) or several (`images`)."""

    image_b64: str | None = Field(None, description="one base64-encoded image")
    images: list[B64Image] | None = Field(None, description="several images, up to the server's max_images")


class Prediction(BaseModel):
    index: int
    label: str
    score: float


class ImageResult(BaseModel):
    image: int
    predictions: list[Prediction]


class Timing(BaseModel):
    decode: float
    preprocess: float
    queue: float
    inference: float
    postprocess: float
    total: float


class ClassifyResponse(BaseModel):
    request_id: str
    model: str
    task: str | None = Field(None, description="the task, for a multi-task model")
    model_version: str
    execution_provider: str
    predictions: list[Prediction] = Field(description="the first (or only) image's top-k")
    results: list[ImageResult] = Field(description="every image's top-k, in request order")
    timing_ms: Timing


class CompareEntry(BaseModel):
    model_version: str
    execution_provider: str
    predictions: list[Prediction]
    queue_ms: float
    inference_ms_per_image: float = Field(description="the batch's inference time divided by its size")
    batch_size: int


class CompareResponse(BaseModel):
    request_id: str
    models: dict[str, CompareEntry]
    top1_agreement: bool
    speedup: float | None = Field(description="backbone / fpet per-image inference time, when both are served")
    timing_ms: dict[str, float]


class MergePoint(BaseModel):
    block: int = Field(description="the block after whose attention the tokens merged")
    method: str = Field(description="fpet (learned matching) or tome")
    tokens_before: int = Field(description="tokens entering the merge, cls included")
    tokens_after: int
    groups: list[list[int]] = Field(
        description="per token after the merge, the original patches it holds (row-major patch indices)"
    )


class ExplainResponse(BaseModel):
    request_id: str
    model: str
    model_version: str
    predictions: list[Prediction]
    grid: list[int] | None = Field(description="patch rows and columns of the model input (null: no merges)")
    merges: list[MergePoint] = Field(description="one entry per merge point, in order; empty for the backbone")
    timing_ms: dict[str, float]


class ErrorBody(BaseModel):
    error: str
    error_type: str
    request_id: str | None = None


# The OpenAPI document's request bodies and error responses, for routes that read their bodies themselves.
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 500, 503, 504)}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as a multipart `file`, a raw JPEG/PNG/WebP body, or JSON (`image_b64` or `images`)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            **{
                t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "image/webp")
            },
            "application/json": {"schema": JsonRequest.model_json_schema()},
        },
    }
}

OIP_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image", "pixel_values"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32", "FP16"]},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "description": "row-major, flat or nested; BYTES elements as base64 strings"},
    },
}
OIP_BODY = {
    "requestBody": {
        "required": True,
        "description": "An Open Inference Protocol request: one input, `image` (BYTES: encoded JPEG/PNG/WebP files, "
        "shape [N] or [N, 1]) or `pixel_values` (FP32 [N, 3, S, S], preprocessed as the model metadata says); with "
        "Triton's binary extension the JSON header is followed by the tensor bytes "
        "(`Inference-Header-Content-Length`).",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": OIP_TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": ["probabilities", "logits"]},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
OIP_RESPONSES = {
    **ERRORS,
    200: {
        "description": "outputs `probabilities` and `logits` (FP32 [N, classes]), or top-k `score:index:label` "
        "strings (BYTES [N, k]) for an output asked with `classification: k`; binary outputs follow the JSON header",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model_name", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
