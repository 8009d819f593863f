"""The endpoints, on one ``APIRouter``:

    POST /detect   score images (body: ``body.py``; answer: ``responses.py``)
    GET  /health   the process is alive (always 200)
    GET  /ready    200 once the model is loaded and warmed up, 503 before and while draining
    GET  /model    what is loaded
    GET  /metrics  Prometheus metrics

Access and readiness are the dependencies of ``dependencies.py``.
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pathguard.detector.inspection import Inspection

from .batching import InferenceTimeout, MicroBatcher, Overloaded, ShuttingDown, Unavailable
from .body import decode_uploads, parse_detect_body
from .dependencies import Serving, get_state, require_key, require_key_for_metrics, serving
from .errors import ERROR_RESPONSES, ClientError
from .images import DecodedImage
from .responses import detect_response
from .schemas import EXAMPLE_PNG_BASE64, DetectResponse, HealthResponse, ModelInfo, ReadyResponse
from .state import ServiceState

router = APIRouter()

# The body of /detect is parsed by hand (body.py), so its schema is given here.
DETECT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "one or more image files (PNG, JPEG, GIF, BMP, WebP)"},
            "resize": {"type": "boolean", "description": "same as the query parameter"},
            "include_path": {"type": "boolean", "description": "same as the query parameter"},
        }}},
    "application/json": {
        "schema": {"$ref": "#/components/schemas/DetectRequest"},
        "example": {"images": [{"data": EXAMPLE_PNG_BASE64, "filename": "shirt.png"}],
                    "resize": False, "include_path": False}},
}}}

# 503 reasons, as counted by pathguard_rejected_total{reason}.
REJECTIONS = ((Overloaded, "overloaded"), (InferenceTimeout, "timeout"), (ShuttingDown, "shutting_down"))


async def inspect_images(batcher: MicroBatcher, decoded: list[DecodedImage], include_path: bool,
                         state: ServiceState) -> list[Inspection]:
    """Inspect the decoded images through the batcher and count them; a busy,
    slow or stopping batcher is a 503 with Retry-After."""
    images = torch.stack([d.tensor for d in decoded])
    try:
        inspections = await batcher.submit(images, include_path=include_path,
                                           timeout=state.settings.inference_timeout_s)
    except Unavailable as exc:
        reason = next((name for kind, name in REJECTIONS if isinstance(exc, kind)), "unavailable")
        state.metrics.rejected.labels(reason).inc()
        raise ClientError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    state.metrics.images_scored.inc(len(inspections))
    state.metrics.images_flagged.inc(sum(1 for i in inspections if i.adversarial))
    return inspections


@router.post(
    "/detect", response_model=DetectResponse, responses=ERROR_RESPONSES, tags=["detection"],
    summary="Score images for adversarial manipulation",
    dependencies=[Depends(require_key)], openapi_extra=DETECT_REQUEST_BODY,
)
async def detect(
    request: Request,
    resize: bool | None = Query(None, description="resize images of another size (bilinear) instead "
                                "of refusing them; for JSON bodies the body field counts too"),
    include_path: bool | None = Query(None, description="also return each image's calculation path"),
    loaded: Serving = Depends(serving),
    state: ServiceState = Depends(get_state),
) -> Response:
    uploads, body_resize, body_path = await parse_detect_body(request, state.settings)
    want_path = bool(include_path) or body_path
    decoded = await decode_uploads(uploads, loaded.spec, bool(resize) or body_resize)
    inspections = await inspect_images(loaded.batcher, decoded, want_path, state)
    return JSONResponse(detect_response(uploads, decoded, inspections, want_path, loaded.inspector.bundle.digest))


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
