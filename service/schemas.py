"""Request and response models of the HTTP API (they also make /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The example image of /docs: Fashion-MNIST test image 7 (a real Shirt), as a
# 28x28 8-bit grey PNG.  The shipped bundle (bundles/fmnist-default) calls it
# a Shirt and does not flag it; tests/test_service_docs.py checks both, and
# that the example answer below is the one the service gives.
EXAMPLE_FILENAME = "shirt.png"
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAACi0lEQVR42k3SS0wTQRgH8G+33aXddku79EFrt28KWMpDYhB8"
    "EECjwUQTNcZo4iuevHgyMSYePBkvejQxxkRNiDcPRkVJIJJqiYEiVAotVgiWUFra3YW6FJZ2PdBtmcscfvn/Z+bLIFBaKFKA"
    "q51yZu4lICIAIgIAApXVPPVdFI4oCrsCAGiZGrqFjnWEv3XsAV4ykJX29tsn/xGCcYd5XzT2ijy/Fx8nVZFp3YXpRLY5vkF7"
    "fOls5TT/LHhdoL0BLt8VIJp0Pc8AAEC+W3rq5tm1ufozGofRm/K6M7Mf9mDvwk8u98ueHHZj/jXTqhys+rXybTU0vyKwnDCf"
    "jm+RTPy50VNTeQqr63d77E6Ho9Hhiq1ourvUVZXaiVddLsqsU2tJmd5aR+jH2Ww56b+Eo3Iux+E4Bhlup7g9uNhTTqpqr/c/"
    "jK1i+4KFdHY+pXvX2DLxRsLI/S/p81yiePmP23yUoUnx40iknKzzFowymbJA+xqqEMxGRVbrmqfLmMcu3pthUX6gLe/8FKSe"
    "thGCli1he7amfqc3qu6e9GprRju3l9qW9QYJg2NNAaYJRxEZb0Dl2HZOEyZTUm3r79ZlszVJ2qxOq9Jky8SwhF3HlfA0cufz"
    "RDFE/5hBOfkUxRieNFgeLZbwblAd12J5NrmMWjTiXwX+IoAGpFpXXhbtO3fAck1HNyosrdSQwYRr09KEDIbx0HygZfOtLyQb"
    "GKcGfWqVUpotafXwh6vltbMiH15nU5h5w2ZXSLXhsXqBFKoPZU6oFjqGaEdsdP96XEou9dmKLRbCiaKYUkkSNLJl2mAkDB8/"
    "CK9zBXWGEgmiiDNzRj8lSl+zWMgMp0Ls5jdjdDL5NTEC+WQ0AQD/AWMh9rfzWupfAAAAAElFTkSuQmCC"
)
EXAMPLE_DETECT_REQUEST = {"images": [{"data": EXAMPLE_PNG_BASE64, "filename": EXAMPLE_FILENAME}],
                          "resize": False, "resize_mode": "pad", "include_path": False}
# The shipped bundle's answer for it (rounded), for the response examples.
EXAMPLE_RESULT = {"index": 0, "filename": EXAMPLE_FILENAME, "predicted_class": 6, "label": "Shirt",
                  "confidence": 0.99039, "adversarial": False, "score": 0.73598, "threshold": 2.68404,
                  "layer_deviations": [0.04918, 0.0, 0.0, 0.0], "active_fraction": 0.9375, "resized": False}

ResizeMode = Literal["pad", "crop", "stretch"]  # images.RESIZE_MODES
RESIZE_DESCRIPTION = (
    "resize an image whose size differs from the model's input (GET /model: `input_shape`) instead of "
    "refusing it, by the rule `resize_mode` names (default `pad`, which keeps the aspect ratio); its "
    "result says `\"resized\": true`")
RESIZE_MODE_DESCRIPTION = (
    "how `resize` brings an image to the model's input size (it matters only when `resize` is true): "
    "`pad` (default) keeps the aspect ratio: the longer side is scaled to fit, the image centred and "
    "the rest filled with the mean of its border pixels (black for an item on a black background); "
    "`crop` keeps the aspect ratio: the shorter side is scaled to fit and the longer one cut, centred; "
    "`stretch` scales each side to fit (the aspect ratio is not kept). Scaling is bilinear, by the "
    "same code as the training data loaders. A square image comes out the same in every mode")
# What the model expects, for the API description (/docs, /redoc) and the schemas.
EXPECTED_INPUT = (
    "**What the model expects.** The shipped model (Fashion-MNIST) takes a 28x28 grey image of one "
    "clothing item, **light on a dark (black) background**, centred and filling most of the frame, as "
    "in Fashion-MNIST: a photo of an item on a white background should be inverted first (the service "
    "never inverts). GET /model gives the loaded model's `input_shape` (channels, height, width) and "
    "`classes`. Send ordinary image files: the service scales pixels to [0, 1] itself (8-bit value / "
    "255, 16-bit PNG value / 65535), as training did. A colour image is converted to grey (ITU-R 601-2 "
    "luma, Pillow's `L`) for a 1-channel model (grey is repeated for a 3-channel one); transparent "
    "pixels are composited onto black (`PATHGUARD_ALPHA_BACKGROUND`); the EXIF orientation is applied. "
    "An image of another size is refused (422) unless `resize=true` is asked for; then `resize_mode` "
    "says how: `pad` (default: keep the aspect ratio, fill with the border colour), `crop` (keep the "
    "aspect ratio, cut the longer side) or `stretch`.")


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(
        ..., min_length=1,
        description="the image file (PNG, JPEG, GIF, BMP or WebP), base64-encoded; a "
                    "'data:image/...;base64,' prefix and line breaks are allowed. For the shipped model: "
                    "28x28 grey, a light item on a black background, as in Fashion-MNIST",
        examples=[EXAMPLE_PNG_BASE64])
    filename: str | None = Field(None, max_length=255, description="echoed back in the result",
                                 examples=[EXAMPLE_FILENAME])


class DetectRequest(BaseModel):
    """JSON form of POST /detect.  Unknown fields are refused.  The shipped
    model expects 28x28 grey images of a light item on a black background,
    as in Fashion-MNIST (see the API description)."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [EXAMPLE_DETECT_REQUEST]})

    images: list[ImageIn] = Field(..., min_length=1, description="one or more images (at most the "
                                  "server's max_images, see GET /model)")
    resize: bool = Field(False, description=RESIZE_DESCRIPTION)
    resize_mode: ResizeMode = Field("pad", description=RESIZE_MODE_DESCRIPTION)
    include_path: bool = Field(False, description="also return each image's calculation path (gate bits "
                               "per gated layer)")


class ImageResult(BaseModel):
    index: int = Field(..., description="position of the image in the request", examples=[0])
    filename: str | None = Field(None, examples=[EXAMPLE_FILENAME])
    predicted_class: int = Field(..., description="index into the model's classes (GET /model)",
                                 examples=[EXAMPLE_RESULT["predicted_class"]])
    label: str = Field(..., description="name of the predicted class", examples=[EXAMPLE_RESULT["label"]])
    confidence: float = Field(..., description="softmax probability of the predicted class",
                              examples=[EXAMPLE_RESULT["confidence"]])
    adversarial: bool = Field(..., description="score > threshold", examples=[EXAMPLE_RESULT["adversarial"]])
    score: float = Field(..., description="path-deviation score; larger = more suspicious",
                         examples=[EXAMPLE_RESULT["score"]])
    threshold: float = Field(..., description="calibrated on clean images for the target false "
                             "positive rate", examples=[EXAMPLE_RESULT["threshold"]])
    layer_deviations: list[float] = Field(
        ..., description="per gated layer, 1 - Jaccard similarity of the image's path to its predicted "
                         "class's path (0 = follows the class exactly)",
        examples=[EXAMPLE_RESULT["layer_deviations"]])
    active_fraction: float = Field(..., description="fraction of gated filters switched on",
                                   examples=[EXAMPLE_RESULT["active_fraction"]])
    resized: bool = Field(..., description="the image was resized to the model's input (see resize_mode)",
                          examples=[EXAMPLE_RESULT["resized"]])
    layer_paths: list[list[int]] | None = Field(
        None, description="only with include_path: the gate bits (0/1) of each gated layer")


class DetectResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"results": [EXAMPLE_RESULT], "model": "<the bundle's digest, see GET /model>"}]})

    results: list[ImageResult]
    model: str = Field(..., description="digest (SHA-256 of the manifest) of the bundle that answered",
                       examples=["3f1c..."])


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="what is wrong", examples=[
        "image 1 ('boot.png'): size 32x32 does not match the model's input 28x28; send 28x28 images or "
        "ask for resize=true (resize_mode: pad, crop, stretch; default pad)"])
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
