"""Request and response models of the HTTP API (they also make /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A 28x28 black PNG: the smallest valid request for the Fashion-MNIST bundle.
EXAMPLE_PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAEElEQVR42mNgGAWjYBQQAwADLAAB1wvpfAAAAABJ"
                      "RU5ErkJggg==")


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(
        ..., min_length=1,
        description="the image file (PNG, JPEG, GIF, BMP or WebP), base64-encoded; a "
                    "'data:image/...;base64,' prefix and line breaks are allowed",
        examples=[EXAMPLE_PNG_BASE64])
    filename: str | None = Field(None, max_length=255, description="echoed back in the result",
                                 examples=["shirt.png"])


class DetectRequest(BaseModel):
    """JSON form of POST /detect.  Unknown fields are refused."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{"images": [{"data": EXAMPLE_PNG_BASE64, "filename": "shirt.png"}],
                                         "resize": False, "include_path": False}]})

    images: list[ImageIn] = Field(..., min_length=1, description="one or more images (at most the "
                                  "server's max_images, see GET /model)")
    resize: bool = Field(False, description="resize images whose size differs from the model's input "
                         "(bilinear) instead of refusing them")
    include_path: bool = Field(False, description="also return each image's calculation path (gate bits "
                               "per gated layer)")


class ImageResult(BaseModel):
    index: int = Field(..., description="position of the image in the request", examples=[0])
    filename: str | None = Field(None, examples=["shirt.png"])
    predicted_class: int = Field(..., examples=[6])
    label: str = Field(..., examples=["Shirt"])
    confidence: float = Field(..., description="softmax probability of the predicted class", examples=[0.93])
    adversarial: bool = Field(..., description="score > threshold", examples=[False])
    score: float = Field(..., description="path-deviation score; larger = more suspicious", examples=[4.2])
    threshold: float = Field(..., description="calibrated on clean images for the target false "
                             "positive rate", examples=[8.47])
    layer_deviations: list[float] = Field(
        ..., description="per gated layer, 1 - Jaccard similarity of the image's path to its predicted "
                         "class's path (0 = follows the class exactly)", examples=[[0.05, 0.12, 0.2, 0.31]])
    active_fraction: float = Field(..., description="fraction of gated filters switched on", examples=[0.48])
    resized: bool = Field(..., description="the image was resized to the model's input", examples=[False])
    layer_paths: list[list[int]] | None = Field(
        None, description="only with include_path: the gate bits (0/1) of each gated layer")


class DetectResponse(BaseModel):
    results: list[ImageResult]
    model: str = Field(..., description="digest (SHA-256 of the manifest) of the bundle that answered",
                       examples=["3f1c..."])


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="what is wrong", examples=[
        "image 1 ('boot.png'): size 32x32 does not match the model's input 28x28; send 28x28 images or "
        "ask for resize=true"])
    index: int | None = Field(None, description="the offending image, for per-image errors")
    filename: str | None = None
    errors: list[dict[str, Any]] | None = Field(None, description="validation errors, field by field")


class HealthResponse(BaseModel):
    status: str = Field("ok", examples=["ok"])


class ReadyResponse(BaseModel):
    status: str = Field(..., description="ready, starting or draining", examples=["ready"])
    model: str | None = Field(None, description="digest of the loaded bundle")


class DetectorInfo(BaseModel):
    score: str = Field(..., examples=["layer-gauss-conf"])
    threshold: float
    target_fpr: float = Field(..., examples=[0.05])


class Limits(BaseModel):
    max_images: int
    max_upload_bytes: int
    max_pixels: int
    inference_timeout_s: float


class BatchingInfo(BaseModel):
    enabled: bool
    batch_size: int
    batch_wait_ms: float
    queue_size: int


class ModelInfo(BaseModel):
    name: str = Field(..., description="bundle directory name", examples=["fmnist-default"])
    digest: str
    architecture: str = Field(..., examples=["vgg-small"])
    classes: list[str]
    input_shape: list[int] = Field(..., description="channels, height, width", examples=[[1, 28, 28]])
    gated_widths: list[int]
    path_bits: int
    detector: DetectorInfo
    card: dict[str, Any] = Field(..., description="the bundle's model card: measured accuracy, sparsity, "
                                 "path and detection figures")
    limits: Limits
    batching: BatchingInfo
