"""Service configuration: one ``Settings`` object, read from ``PATHGUARD_*``
environment variables (or passed explicitly), validated on construction.

    PATHGUARD_BUNDLE              bundle directory (default: the shipped one)
    PATHGUARD_EXPECTED_DIGEST     pin the bundle: refuse to start unless its digest is this
    PATHGUARD_HOST / _PORT        where `pathguard serve` listens (port 0 = any free port)
    PATHGUARD_MAX_IMAGES          images per request (default 32)
    PATHGUARD_MAX_UPLOAD_BYTES    request body limit (default 5 MiB)
    PATHGUARD_MAX_PIXELS          pixels per image, checked from the header before decoding
    PATHGUARD_ALPHA_BACKGROUND    grey level (0-255) transparent pixels are composited on
    PATHGUARD_API_KEY             if set, /detect and /model need it (X-API-Key or Bearer)
    PATHGUARD_PROTECT_METRICS     also require the key for /metrics
    PATHGUARD_BATCHING            coalesce concurrent requests into one forward pass
    PATHGUARD_BATCH_SIZE          most images in one inference call (default 64)
    PATHGUARD_BATCH_WAIT_MS       how long a batch waits for more images (default 0: under load
                                  batches fill while the worker is busy; a wait only delays a lone image)
    PATHGUARD_FORWARD_CHUNK       images per forward pass (default 8): every pass has exactly this
                                  many (padded), so an image's answer does not depend on what
                                  shares its batch; 0 = one pass per batch (it then does, in the
                                  last bits)
    PATHGUARD_QUEUE_SIZE          most images waiting for inference; beyond it: 503
    PATHGUARD_INFERENCE_TIMEOUT_S per-request limit on queueing + inference; beyond it: 503
    PATHGUARD_RETRY_AFTER_S       the Retry-After sent with those 503s
    PATHGUARD_TORCH_THREADS       torch intra-op threads (default: torch's own choice)
    PATHGUARD_INFERENCE_PROCESS   run inference in separate worker processes (default true)
                                  rather than on a thread of the server process
    PATHGUARD_INFERENCE_WORKERS   inference worker processes, each taking whole batches (default:
                                  one per usable core, at most 4; see service/state.py)
    PATHGUARD_GC_FREEZE           freeze the start-up heap out of the garbage collector's reach
                                  (default true; false only to measure what it saves)
    PATHGUARD_LOG_LEVEL           uvicorn / service log level
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pathguard.detector.bundle import DEFAULT_BUNDLE
from pathguard.detector.inspection import DEFAULT_CHUNK


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATHGUARD_", extra="forbid", validate_default=True)

    bundle: Path = Field(DEFAULT_BUNDLE, description="bundle directory to serve")
    expected_digest: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="if set, refuse to start unless the bundle's digest (SHA-256 of its manifest) is this")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535, description="0 = any free port")

    max_images: int = Field(32, ge=1, le=10_000, description="most images in one request")
    max_upload_bytes: int = Field(5 * 1024 * 1024, ge=1024, description="most bytes in one request body")
    max_pixels: int = Field(4096 * 4096, ge=1, description="most pixels (width x height) of one image")
    alpha_background: int = Field(
        0, ge=0, le=255,
        description="grey level transparent pixels are composited onto (0 = black, the background of "
                    "Fashion-MNIST / MNIST; 255 = white)")

    api_key: SecretStr | None = Field(None, description="if set, /detect and /model require it")
    protect_metrics: bool = Field(False, description="require the API key for /metrics too")

    batching: bool = Field(True, description="coalesce concurrent requests into one forward pass")
    batch_size: int = Field(64, ge=1, le=4096, description="most images in one inference call")
    batch_wait_ms: float = Field(0.0, ge=0, le=10_000, description="how long a batch waits to fill")
    queue_size: int = Field(1024, ge=1, description="most images waiting for inference")
    forward_chunk: int = Field(
        DEFAULT_CHUNK, ge=0, le=4096,
        description="images per forward pass, padded: an image's answer is then bit-identical whatever "
                    "shares its batch (pathguard.detector.inspection); 0 = the whole batch in one pass")
    small_passes: bool = Field(
        True, description="answer a few images in a smaller pass than forward_chunk where that pass is "
                          "measured at start-up to give the same bits (pathguard.detector.inspection); false = "
                          "always a padded pass of forward_chunk")
    engine: Literal["auto", "sparse", "dense"] = Field(
        "auto", description="how the forward pass runs (pathguard.detector.inspection): 'sparse' image by image, "
                            "skipping switched-off filters (a lone image 2.1-2.5x faster on the CPU); 'dense' "
                            "the whole pass at once; 'auto' = sparse on the CPU, dense on a GPU")
    inference_timeout_s: float = Field(10.0, gt=0, le=3600, description="per-request time limit")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 503")

    torch_threads: int | None = Field(None, ge=1, le=1024)
    inference_process: bool = Field(
        True, description="run inference in one worker process (no GIL shared with the event loop) "
                          "instead of on a thread of the server process")
    inference_workers: int | None = Field(
        None, ge=1, le=64,
        description="inference worker processes, each running whole batches side by side (default: one "
                    "per usable core, at most 4)")
    gc_freeze: bool = Field(
        True, description="after start-up, move the objects alive then (torch, the model, the app) out of the "
                          "garbage collector's reach, in the server and in each worker (service/state.py)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("expected_digest", mode="before")
    @classmethod
    def _blank_digest_is_none(cls, value):
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_key_is_none(cls, value):
        # PATHGUARD_API_KEY="" means "no key", not "the empty key".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_key")
    @classmethod
    def _key_has_no_whitespace(cls, value: SecretStr | None):
        if value is not None and value.get_secret_value() != value.get_secret_value().strip():
            raise ValueError("api_key must not begin or end with whitespace")
        return value

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> "Settings":
        if self.queue_size < self.max_images:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be >= max_images ({self.max_images}), "
                "or a full-size request could never be accepted")
        return self

    @model_validator(mode="after")
    def _workers_are_processes(self) -> "Settings":
        if (self.inference_workers or 1) > 1 and not self.inference_process:
            raise ValueError("inference_workers > 1 needs inference_process (worker processes); "
                             "in-process inference runs on one thread")
        return self

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000.0
