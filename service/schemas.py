"""Request and response models of the HTTP API (they also make /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The example image of /docs: Fashion-MNIST test image 92 (a real Shirt), as a
# 28x28 8-bit grey PNG.  The shipped bundle (bundles/fmnist-default) calls it
# a Shirt and does not flag it; tests/test_service_docs.py checks both, and
# that the example answer below is the one the service gives.
EXAMPLE_FILENAME = "shirt.png"
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAB2UlEQVR42lXSsU4UURQG4P8/984wI7gLi7uLiVESNG6isZHC0kJb"
    "rHwBba2sLX0DK1/AJ/AJTDRqY+FaGEWEBSIbggJmHWbmnmODd8dTni//Oc1PnA4N9x8f5wf34FXx33gAGG9/+fprDQDkNPAvJg8f"
    "LFqZKavnzwyiU0T76e1OUaas0iJLD98+mrgwxQ+949KRrLK6Ni5+uovp9SdLY0tF1ViYd7J3fa2Bq1VqIUDIBEp6vdPAGypKJxKc"
    "Jw0SBg38yQQwtTLs1TSf1hcbeK1KHSmapXOEJWl1voGucrkHJYQMMK86N8UlR2UNSqiEKkIbLUccWOAshTojQdB+88e5lYh9uHo0"
    "EwCIaUh2vUc/4nIlJ8MWwCo4kWz3RGw+YqfWVqIwiGhQnBU0MC/an1/OlzQRSMg3t9PQnv4s8qPEmVGVonJmmCGJOD+Z3cgNBAFK"
    "MdjoNJJibqcHAoSalK13CBci1sDHfiBgoLHsvkf6KmIBvm7VYkYAvri0YHIz4r7HUQaAAoMVi9l+aEX85n6IHTgIAYothO/ZVsSt"
    "UGoWQAcQqGUy9lXEy93+YNgJVgFWl+fWf68EidW8ssoX2BH11ttV614dJflRo7cAcGu2ODxptTfX4+YvF6rOeukordwAAAAASUVO"
    "RK5CYII="
)
EXAMPLE_DETECT_REQUEST = {"images": [{"data": EXAMPLE_PNG_BASE64, "filename": EXAMPLE_FILENAME}],
                          "resize": False, "resize_mode": "pad", "include_path": False}
# The shipped bundle's answer for it (rounded), for the response examples.
EXAMPLE_RESULT = {"index": 0, "filename": EXAMPLE_FILENAME, "predicted_class": 6, "label": "Shirt",
                  "confidence": 0.99675, "adversarial": False, "score": 0.68905, "threshold": 3.97673,
                  "layer_deviations": [0.06452, 0.07087, 0.0, 0.10241, 0.22917, 0.10853],
                  "active_fraction": 0.52665, "resized": False,
                  "evidence": {"most_deviating": "confidence",
                               "layer_classes": ["Pullover", "Pullover", "Pullover", "Shirt", "Shirt", "Shirt"],
                               "p_values": {"value:moments0": 0.87083, "confidence": 0.50206, "path": 0.75329},
                               "early_class": "Pullover"}}

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


class Evidence(BaseModel):
    most_deviating: str = Field(..., description="the detector's most deviating check: a channel such as "
                                "`value:moments0` (the first block's activations against the predicted class) or "
                                "`confidence`, or for the first path scores `gated layer I`")
    p_values: dict[str, float] | None = Field(
        None, description="per channel, the share of clean held-out images that deviate at least as much "
                          "(small = unusual); null for detectors without channels")
    layer_classes: list[str] = Field(..., description="per gated layer, the class its path points to")
    early_class: str | None = Field(..., description="the class the first gated layer's path points to")


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
    evidence: Evidence = Field(..., description="which check deviates most and which class each gated "
                               "layer's path points to", examples=[EXAMPLE_RESULT["evidence"]])
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
    score: str = Field(..., examples=["fusion-moments"])
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
    architecture: str = Field(..., examples=["vgg7"])
    classes: list[str]
    input_shape: list[int] = Field(..., description="channels, height, width", examples=[[1, 28, 28]])
    gated_widths: list[int]
    path_bits: int
    detector: DetectorInfo
    card: dict[str, Any] = Field(..., description="the bundle's model card: measured accuracy, sparsity, "
                                 "path and detection figures")
    limits: Limits
    batching: BatchingInfo
    engine: Literal["sparse", "dense"] = Field(
        ..., description="how the forward pass runs: 'sparse' = image by image, switched-off filters skipped; "
                         "'dense' = the whole pass at once (the service's `engine` setting)")
