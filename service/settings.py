"""Service settings: environment variables `FPET_*`, overridden by `fpet serve` flags. Every default is safe for a
single CPU host; the descriptions are the documentation (docs/reference/settings.md is generated from them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FPET_", extra="ignore")

    bundles: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bundle folders, comma-separated; empty: the default model's two bundles"
    )
    default_model: str = Field("fpet", description="the variant /classify uses without ?model=")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in the container image)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="also serve the OIP over gRPC on this port (Triton's is 8001); off if unset"
    )
    workers: int = Field(1, ge=1, description="uvicorn workers; on a GPU scale with replicas instead")
    runtime: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="auto: OpenVINO where the CPU has a bf16 matrix engine (AMX, AVX512-BF16) and no GPU is "
        "used, onnxruntime elsewhere",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="compute precision; auto: bf16 with OpenVINO, the bundle's own with onnxruntime"
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime's execution provider; auto: CUDA when onnxruntime has it, else CPU"
    )
    allow_cpu_fallback: bool = Field(
        True,
        description="when CUDA was asked for and onnxruntime gave the CPU: serve (counted in "
        "fpet_execution_provider_fallback_total), or stay not ready (false)",
    )
    threads: int = Field(0, ge=0, description="threads per instance (0: the cores split between the instances)")
    instances: int = Field(
        1,
        ge=1,
        description="batches of one model run side by side (Triton's instance count); more: throughput "
        "under load, fewer: latency when idle",
    )
    max_batch_size: int = Field(0, ge=0, description="largest batch per model (0: 32 on a GPU, 8 on a CPU)")
    max_delay_ms: float = Field(
        2.0, ge=0, description="longest wait to fill a batch, only under load (a lone request never waits)"
    )
    max_queue_images: int = Field(64, ge=1, description="queued images per model before 429")
    admission_wait_ms: float = Field(
        250.0, ge=0, description="how long a request may wait for a place in a full queue before its 429"
    )
    explain_concurrency: int = Field(1, ge=1, description="explanations computed at once; more get a 429")
    deadline_ms: float = Field(
        10_000,
        gt=0,
        description="a request still queued after this is dropped with 504; the X-Request-Timeout-Ms header may "
        "shorten it",
    )
    max_bytes: int = Field(8 * 2**20, gt=0, description="largest request body, in bytes")
    max_pixels: int = Field(40_000_000, gt=0, description="largest decoded image (decompression-bomb guard)")
    max_request_pixels: int = Field(
        40_000_000,
        gt=0,
        description="most decoded pixels of all of a request's images together (a JPEG counts at "
        "the reduced size it decodes to): many small files that decode big cost no more than one large image",
    )
    max_images: int = Field(16, ge=1, description="most images in one JSON request")
    api_key: SecretStr | None = Field(
        None, description="if set, the classify endpoints need it: Authorization: Bearer KEY or X-API-Key: KEY"
    )
    drain_timeout_s: float = Field(30.0, gt=0, description="how long SIGTERM waits for queued requests")
    model_control_mode: Literal["none", "explicit"] = Field(
        "none",
        description="explicit: load, swap and unload models at run time through /v2/repository (Triton's "
        "model control); none: the bundles given at start, and those endpoints answer 403",
    )
    admin_key: SecretStr | None = Field(
        None, description="the Bearer key of the model-control endpoints (required with explicit mode; not the API key)"
    )
    shadow_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of the default variant's requests also run on the reference variant, "
        "outside the request path, to measure their top-1 agreement on live traffic (0: off)",
    )
    shadow_reference: str = Field("backbone", description="the variant shadow requests are compared with")
    selfcheck: Literal["on", "off"] = Field(
        "on",
        description="on: a model whose self-check fails on this runtime is not ready (the others serve); off: it "
        "serves anyway, counted and logged as a warning",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per request and per log record, on stderr"
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); off if unset"
    )

    @model_validator(mode="after")
    def _admin_key_for_control(self) -> Settings:
        if self.admin_key is not None and not self.admin_key.get_secret_value().strip():
            self.admin_key = None  # an empty key (an unset compose variable) is no key: it must not open the endpoints
        if self.model_control_mode == "explicit" and self.admin_key is None:
            raise ValueError(
                "model control mode explicit needs FPET_ADMIN_KEY, the key that may load and unload models"
            )
        return self

    @field_validator("bundles", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
