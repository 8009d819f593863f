"""The endpoints, on one ``APIRouter``:

    POST /detect   score images (body: ``body.py``; answer: ``responses.py``)
    GET  /health   the process is alive (always 200)
    GET  /ready    200 once the model is loaded and warmed up, 503 before and while draining
    GET  /model    what is loaded
    GET  /metrics  Prometheus metrics

Access and readiness are the dependencies of ``dependencies.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError

from pathguard.detector.inspection import Inspection

from . import images as _images
from . import schemas as _schemas
from .batching import InferenceTimeout, MicroBatcher, Overloaded, ShuttingDown, Unavailable
from .body import RESIZE_MODES, decode_body, parse_detect_body
from .dependencies import get_state, loaded_model, require_key, require_key_for_metrics, serving
from .errors import ERROR_RESPONSES, ClientError
from .responses import FastJSONResponse, detect_response
from .schemas import EXAMPLE_PNG_BASE64, DetectResponse, HealthResponse, ModelInfo, ReadyResponse
from .state import ServiceState

router = APIRouter()

# What the query parameter resize_mode takes (images.RESIZE_MODES, when the decoder has modes).
ResizeModeQuery = Literal[RESIZE_MODES] if RESIZE_MODES else str  # type: ignore[valid-type]

_MULTIPART_FIELDS = {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"},
              "description": "one or more image files (PNG, JPEG, GIF, BMP, WebP)"},
    "resize": {"type": "boolean", "description": "same as the query parameter"},
    "include_path": {"type": "boolean", "description": "same as the query parameter"},
}
if RESIZE_MODES:
    _MULTIPART_FIELDS["resize_mode"] = {"type": "string", "enum": list(RESIZE_MODES),
                                        "description": "same as the query parameter"}

# The body of /detect is parsed by hand (body.py), so its schema is given here.
DETECT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": _MULTIPART_FIELDS}},
    "application/json": {
        "schema": {"$ref": "#/components/schemas/DetectRequest"},
        "example": getattr(_schemas, "EXAMPLE_DETECT_REQUEST", None) or {
            "images": [{"data": EXAMPLE_PNG_BASE64, "filename": "shirt.png"}], "resize": False,
            "include_path": False}},
    "application/octet-stream": {
        "schema": {"type": "string", "format": "binary"},
        "description": "the fastest form: the bytes of one image file (PNG, JPEG, GIF, BMP, WebP), or a NumPy "
                       ".npy array (numpy.save) of shape (N, H, W) (1-channel models) or (N, C, H, W), dtype "
                       "uint8 (0-255) or float32 (values in [0, 1]), of the model's input size (arrays are not "
                       "resized); pickled (object) arrays are refused. The flags are the query parameters."},
}}}

# 503 reasons, as counted by pathguard_rejected_total{reason}.
REJECTIONS = ((Overloaded, "overloaded"), (InferenceTimeout, "timeout"), (ShuttingDown, "shutting_down"))


async def inspect_images(batcher: MicroBatcher, images: torch.Tensor, include_path: bool,
                         state: ServiceState) -> list[Inspection]:
    """Inspect the images (N, C, H, W) through the batcher and count them; a
    busy, slow or stopping batcher is a 503 with Retry-After."""
    try:
        inspections = await batcher.submit(images, include_path=include_path,
                                           timeout=state.settings.inference_timeout_s)
    except Unavailable as exc:
        reason = next((name for kind, name in REJECTIONS if isinstance(exc, kind)), "unavailable")
        state.metrics.rejected.labels(reason).inc()
        raise ClientError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    state.metrics.images_scored.inc(len(inspections))
    flagged = sum(1 for i in inspections if i.adversarial)
    if flagged:
        state.metrics.images_flagged.inc(flagged)
    return inspections


def _resize_request(resize: bool | None, mode: str | None, body_resize: bool, body_mode: str | None):
    """What ``images.decode_image`` gets as ``resize``: the query's and the body's flags together."""
    combine = getattr(_images, "resize_request", None)
    if combine is not None:
        return combine(resize, mode, body_resize, body_mode)
    return bool(resize) or body_resize


class DetectQuery(BaseModel):
    """The query parameters of POST /detect (parsed by ``detect_query``)."""

    model_config = ConfigDict(extra="ignore")

    resize: bool | None = None
    resize_mode: ResizeModeQuery | None = None  # type: ignore[valid-type]
    include_path: bool | None = None


NO_QUERY = DetectQuery()

# Documented here because /detect reads its query itself (``detect_query``).
DETECT_QUERY_PARAMETERS = [
    {"name": "resize", "in": "query", "required": False, "schema": {"type": "boolean"},
     "description": "resize image files of another size instead of refusing them; for multipart and JSON "
                    "bodies the body field counts too"},
    *([{"name": "resize_mode", "in": "query", "required": False,
        "schema": {"type": "string", "enum": list(RESIZE_MODES)},
        "description": f"how resize brings an image to the model's input size ({', '.join(RESIZE_MODES)}; "
                       "see the JSON body's resize_mode)"}] if RESIZE_MODES else []),
    {"name": "include_path", "in": "query", "required": False, "schema": {"type": "boolean"},
     "description": "also return each image's calculation path"},
]


def detect_query(request: Request) -> DetectQuery:
    """The query of a /detect request, validated as FastAPI validates query
    parameters (the same 422 on a bad value).  Read here rather than declared
    as parameters: FastAPI's per-request work for declared parameters and
    dependencies was a third of the cost of a small /detect request."""
    if not request.scope.get("query_string"):
        return NO_QUERY
    try:
        return DetectQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in errors]) from None


@router.post(
    "/detect", response_model=DetectResponse, responses=ERROR_RESPONSES, tags=["detection"],
    summary="Score images for adversarial manipulation",
    dependencies=[Depends(require_key)],
    openapi_extra={**DETECT_REQUEST_BODY, "parameters": DETECT_QUERY_PARAMETERS},
)
async def detect(request: Request) -> Response:
    state: ServiceState = request.app.state.pathguard
    loaded = loaded_model(state)
    query = detect_query(request)
    body = await parse_detect_body(request, state.settings, loaded.spec)
    want_path = bool(query.include_path) or body.include_path
    wanted = _resize_request(query.resize, query.resize_mode, body.resize, body.resize_mode)
    decoded = await decode_body(body, loaded.spec, wanted)
    inspections = await inspect_images(loaded.batcher, decoded.images, want_path, state)
    return FastJSONResponse(detect_response(body.uploads, decoded.resized, inspections, want_path,
                                            loaded.inspector.bundle.digest))


@router.get("/health", response_model=HealthResponse, tags=["operations"], summary="Liveness")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyResponse, tags=["operations"], summary="Readiness",
            responses={503: {"model": ReadyResponse, "description": "starting or draining"}})
async def ready(state: ServiceState = Depends(get_state)) -> Response:
    if state.ready and state.batcher is not None and state.batcher.running:
        return JSONResponse({"status": "ready", "model": state.inspector.bundle.digest})
    status = "draining" if state.draining else "starting"
    return JSONResponse({"status": status, "model": None}, status_code=503,
                        headers={"Retry-After": str(state.settings.retry_after_s)})


@router.get("/model", response_model=ModelInfo, tags=["model"], summary="What is loaded",
            dependencies=[Depends(require_key), Depends(serving)],
            responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]})
async def model(state: ServiceState = Depends(get_state)) -> Response:
    return JSONResponse(state.model_info)


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics",
            dependencies=[Depends(require_key_for_metrics)],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"},
                       401: ERROR_RESPONSES[401]})
async def prometheus_metrics(state: ServiceState = Depends(get_state)) -> Response:
    if state.batcher is not None:
        state.metrics.queue_images.set(state.batcher.pending)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
