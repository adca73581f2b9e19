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


class ErrorBody(BaseModel):
    error: str
    error_type: str
    request_id: str | None = None
