"""The PathGuard HTTP service.

``create_app(settings)`` builds the FastAPI app; the bundle is loaded (its
manifest verified first) and warmed up in the app's lifespan, so a server
either serves a whole, verified model or does not start.

Endpoints (see /docs):

    POST /detect   score images: multipart (field ``files``, repeated) or JSON
                   {"images": [{"data": base64, "filename": ...}], "resize", "include_path"}
    GET  /health   the process is alive (always 200)
    GET  /ready    200 once the model is loaded and warmed up, 503 before and while draining
    GET  /model    what is loaded: classes, input shape, detector, threshold, model card
    GET  /metrics  Prometheus metrics

Error contract: every error is JSON ``{"detail": "<what is wrong>"}``; a
per-image error also carries ``index`` and ``filename``, a validation error
``errors`` (field by field).  A request is all-or-nothing: if any image is
unusable, the whole request is refused with a 4xx that names that image
(the first one found) and the reason; nothing is scored.

    400  body is not parseable (empty, malformed JSON or multipart, bad Content-Length)
    401  API key missing or wrong (when one is configured)
    404  no such endpoint;  405  wrong method (the Allow header lists the right one)
    413  body over max_upload_bytes, or more than max_images images
    415  Content-Type is neither multipart/form-data nor application/json
    422  well-formed but invalid: missing/unknown/mistyped fields, no 'files' field, not an
         image, truncated, zero-size, over max_pixels, animated, wrong size without resize,
         malformed base64
    503  queue full, inference over its time limit, or shutting down (with Retry-After)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from pathguard.detector.artifacts import ArtifactError
from pathguard.detector.inference import Inspection, Inspector

from .batching import InferenceTimeout, MicroBatcher, Overloaded, ShuttingDown, Unavailable
from .images import DecodedImage, ImageError, ImageSpec, configure_pillow, decode_image
from .metrics import MetricsMiddleware, ServiceMetrics
from .schemas import (
    EXAMPLE_PNG_BASE64, DetectRequest, DetectResponse, ErrorResponse, HealthResponse, ImageResult, ModelInfo,
    ReadyResponse,
)
from .settings import Settings

log = logging.getLogger("pathguard.service")

FORM_FIELDS = ("files", "resize", "include_path")
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


class BundleError(RuntimeError):
    """The bundle cannot be served (missing, tampered, incomplete)."""


class ClientError(Exception):
    """A client mistake: becomes a JSON 4xx (or 503) response."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = {k: v for k, v in extra.items() if v is not None}


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    inspector: Inspector | None = None
    batcher: MicroBatcher | None = None
    spec: ImageSpec | None = None
    ready: bool = False
    draining: bool = False
    model_info: dict = field(default_factory=dict)


@dataclass
class Upload:
    index: int
    filename: str | None
    data: bytes | None = None
    base64: str | None = None


# ------------------------------------------------------------------ helpers

def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pathguard")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "0.1.0"


def _finite(obj):
    """JSON-safe copy: non-finite floats (a card from elsewhere may hold them) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _error_response(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    body = {"detail": detail, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _summarise_validation(errors: list[dict], prefix: str = "") -> tuple[str, list[dict]]:
    items = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
        items.append({"loc": loc, "msg": err.get("msg", "invalid"), "type": err.get("type", "")})
    shown = "; ".join(f"{e['loc']}: {e['msg']}" for e in items[:5])
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    return f"{prefix}{shown}{more}", items[:20]


def _parse_bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ClientError(422, f"form field {name!r} must be true or false, got {value[:40]!r}")


def _clean_filename(name: str | None) -> str | None:
    if not name:
        return None
    return name.replace("\x00", "")[:255] or None


def _decode_base64(text: str, index: int, filename: str | None) -> bytes:
    payload = text
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError(index, filename, "a data: URL must be of the form 'data:<type>;base64,<data>'")
    payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(index, filename, f"malformed base64 data ({exc})") from None
    if not data:
        raise ImageError(index, filename, "empty file (base64 data decodes to 0 bytes)")
    return data


def _decode_all(uploads: list[Upload], spec: ImageSpec, resize: bool) -> list[DecodedImage]:
    out = []
    for up in uploads:
        data = up.data if up.data is not None else _decode_base64(up.base64 or "", up.index, up.filename)
        out.append(decode_image(data, spec, index=up.index, filename=up.filename, resize=resize))
    return out


# ---------------------------------------------------------------- factory

def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics(settings.batch_size)
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_pillow(settings.max_pixels)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        try:
            inspector = await run_in_threadpool(Inspector.load, settings.bundle)
            _check_provenance(inspector, settings)
        except (ArtifactError, ValueError, OSError) as exc:
            message = f"cannot serve bundle {settings.bundle}: {exc}"
            log.error(message)
            raise BundleError(message) from exc
        channels, height, width = inspector.input_shape
        if channels not in (1, 3):
            raise BundleError(f"cannot serve bundle {settings.bundle}: {channels}-channel input is not supported")
        state.inspector = inspector
        state.spec = ImageSpec(channels, height, width, settings.max_pixels, settings.alpha_background)
        state.model_info = _model_info(inspector, settings)
        metrics.model_info.labels(inspector.bundle.path.name, inspector.bundle.digest,
                                  inspector.detector.score).set(1)

        def infer(images: torch.Tensor, include_path: bool) -> list[Inspection]:
            return inspector.inspect(images, include_path=include_path)

        batcher = MicroBatcher(
            infer, max_batch=settings.batch_size, max_wait_s=settings.batch_wait_s,
            max_queue=settings.queue_size, coalesce=settings.batching, retry_after=settings.retry_after_s,
            on_batch=metrics.observe_batch)
        await batcher.start()
        state.batcher = batcher
        try:
            # Warm-up: one forward pass on the inference thread before /ready says so.
            await batcher.run_in_worker(infer, torch.zeros((1, channels, height, width)), True)
        except Exception as exc:
            await batcher.close()
            raise BundleError(f"cannot serve bundle {settings.bundle}: warm-up pass failed: {exc}") from exc
        state.ready = True
        log.info("serving bundle %s (digest %s..., score %s, threshold %.4g); API key %s",
                 inspector.bundle.path.name, inspector.bundle.digest[:12], inspector.detector.score,
                 inspector.detector.threshold, "required" if settings.api_key else "not required")
        try:
            yield
        finally:
            state.ready = False
            state.draining = True
            log.info("draining: finishing %d queued images", batcher.pending)
            await batcher.close(timeout=settings.inference_timeout_s + 5)
            log.info("stopped")

    app = FastAPI(
        title="PathGuard",
        version=_version(),
        description=(
            "Adversarial-image detection from the calculation paths of a decoupled network.\n\n"
            "POST images to **/detect** (multipart field `files`, or JSON with base64 data). Every "
            "error is a JSON `{\"detail\": ...}` that says what is wrong; one unusable image makes the "
            "whole request fail with a 4xx naming it. When an API key is configured, send it as "
            "`X-API-Key: <key>` or `Authorization: Bearer <key>`."),
        lifespan=lifespan,
    )
    app.state.pathguard = state
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------ errors

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError):
        return _error_response(exc.status, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        detail, items = _summarise_validation(list(exc.errors()), "invalid request: ")
        return _error_response(422, detail, errors=items)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"no such endpoint: {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            detail = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
        return _error_response(exc.status_code, str(detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal server error")

    # ------------------------------------------------------------ access

    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, if configured")
    bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")

    def check_key(x_api_key: str | None, credentials: HTTPAuthorizationCredentials | None) -> None:
        if settings.api_key is None:
            return
        supplied = x_api_key if x_api_key is not None else (credentials.credentials if credentials else None)
        if not supplied:
            raise ClientError(401, "missing API key: send it in the X-API-Key header or as "
                                   "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
        expected = settings.api_key.get_secret_value().encode("utf-8")
        if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), expected):
            raise ClientError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})

    async def require_key(x_api_key: str | None = Security(key_header),
                          credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        check_key(x_api_key, credentials)

    async def require_key_for_metrics(x_api_key: str | None = Security(key_header),
                                      credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if settings.protect_metrics:
            check_key(x_api_key, credentials)

    def serving() -> tuple[Inspector, MicroBatcher, ImageSpec]:
        if not state.ready or state.batcher is None or state.inspector is None:
            reason = "server is shutting down" if state.draining else "model is not loaded yet"
            raise ClientError(503, reason, {"Retry-After": str(settings.retry_after_s)})
        return state.inspector, state.batcher, state.spec

    error_responses = {
        code: {"model": ErrorResponse, "description": text} for code, text in {
            400: "body not parseable (empty, malformed JSON or multipart)",
            401: "API key missing or wrong",
            413: "body or image count over the limits",
            415: "unsupported Content-Type",
            422: "invalid request or unusable image (the detail names it)",
            503: "busy, timed out or shutting down; retry after Retry-After seconds",
        }.items()
    }

    # ------------------------------------------------------------ routes

    @app.post(
        "/detect", response_model=DetectResponse, responses=error_responses, tags=["detection"],
        summary="Score images for adversarial manipulation",
        dependencies=[Depends(require_key)],
        openapi_extra={"requestBody": {"required": True, "content": {
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
        }}},
    )
    async def detect(
        request: Request,
        resize: bool | None = Query(None, description="resize images of another size (bilinear) instead "
                                    "of refusing them; for JSON bodies the body field counts too"),
        include_path: bool | None = Query(None, description="also return each image's calculation path"),
    ) -> Response:
        inspector, batcher, spec = serving()
        try:
            uploads, body_resize, body_path = await _parse_detect_body(request, settings)
        except ClientError:
            raise
        except Exception as exc:  # noqa: BLE001 - no client input may cause a 500
            log.warning("unparseable /detect body (%s: %s)", type(exc).__name__, exc)
            raise ClientError(400, f"could not parse the request body ({type(exc).__name__})") from None
        do_resize = bool(resize) or body_resize
        want_path = bool(include_path) or body_path
        try:
            decoded = await run_in_threadpool(_decode_all, uploads, spec, do_resize)
        except ImageError as exc:
            raise ClientError(exc.status, str(exc), index=exc.index, filename=exc.filename) from None
        images = torch.stack([d.tensor for d in decoded])
        try:
            inspections = await batcher.submit(images, include_path=want_path,
                                               timeout=settings.inference_timeout_s)
        except Unavailable as exc:
            reason = ("overloaded" if isinstance(exc, Overloaded) else "timeout"
                      if isinstance(exc, InferenceTimeout) else "shutting_down"
                      if isinstance(exc, ShuttingDown) else "unavailable")
            metrics.rejected.labels(reason).inc()
            raise ClientError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        metrics.images_scored.inc(len(inspections))
        metrics.images_flagged.inc(sum(1 for i in inspections if i.adversarial))
        results = []
        for up, dec, ins in zip(uploads, decoded, inspections):
            item = ImageResult(
                index=up.index, filename=up.filename, predicted_class=ins.predicted_class, label=ins.label,
                confidence=ins.confidence, adversarial=ins.adversarial, score=ins.score,
                threshold=ins.threshold, layer_deviations=ins.layer_deviations,
                active_fraction=ins.active_fraction, resized=dec.resized,
                layer_paths=ins.layer_paths if want_path else None,
            ).model_dump()
            if not want_path:
                item.pop("layer_paths")
            results.append(item)
        return JSONResponse({"results": results, "model": inspector.bundle.digest})

    @app.get("/health", response_model=HealthResponse, tags=["operations"], summary="Liveness")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", response_model=ReadyResponse, tags=["operations"], summary="Readiness",
             responses={503: {"model": ReadyResponse, "description": "starting or draining"}})
    async def ready() -> Response:
        if state.ready and state.batcher is not None and state.batcher.running:
            return JSONResponse({"status": "ready", "model": state.inspector.bundle.digest})
        status = "draining" if state.draining else "starting"
        return JSONResponse({"status": status, "model": None}, status_code=503,
                            headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/model", response_model=ModelInfo, tags=["model"], summary="What is loaded",
             dependencies=[Depends(require_key)],
             responses={401: error_responses[401], 503: error_responses[503]})
    async def model() -> Response:
        serving()
        return JSONResponse(state.model_info)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             dependencies=[Depends(require_key_for_metrics)],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text exposition format"},
                        401: error_responses[401]})
    async def prometheus_metrics() -> Response:
        if state.batcher is not None:
            metrics.queue_images.set(state.batcher.pending)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        request_schema = DetectRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request_schema.pop("$defs", {}))
        components["DetectRequest"] = request_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


def _check_provenance(inspector: Inspector, settings: Settings) -> None:
    """Refuse a bundle other than the pinned one.  (Detector files that the
    manifest does not cover are already refused by detector.fit.load_detector.)"""
    if settings.expected_digest and inspector.bundle.digest != settings.expected_digest:
        raise ArtifactError(f"{inspector.bundle.path}: digest {inspector.bundle.digest} is not the expected "
                            f"{settings.expected_digest}")


def _model_info(inspector: Inspector, settings: Settings) -> dict:
    bundle, det = inspector.bundle, inspector.detector
    widths = list(inspector.model.gated_widths)
    info = ModelInfo(
        name=bundle.path.name, digest=bundle.digest, architecture=bundle.arch.name,
        classes=list(bundle.classes), input_shape=list(bundle.input_shape), gated_widths=widths,
        path_bits=sum(widths),
        detector={"score": det.score, "threshold": det.threshold, "target_fpr": det.target_fpr},
        card=_finite(bundle.card),
        limits={"max_images": settings.max_images, "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels, "inference_timeout_s": settings.inference_timeout_s},
        batching={"enabled": settings.batching, "batch_size": settings.batch_size,
                  "batch_wait_ms": settings.batch_wait_ms, "queue_size": settings.queue_size},
    )
    return info.model_dump()


# ------------------------------------------------------------ body parsing

SUPPORTED_TYPES = "multipart/form-data (field 'files') or application/json ({\"images\": [{\"data\": <base64>}]})"


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ClientError(400, f"invalid Content-Length header {length[:40]!r}") from None
        if declared > limit:
            raise ClientError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ClientError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def _parse_detect_body(request: Request, settings: Settings) -> tuple[list[Upload], bool, bool]:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    is_multipart = media == "multipart/form-data"
    if media and not (is_json or is_multipart):
        raise ClientError(415, f"unsupported Content-Type {media[:80]!r}: send {SUPPORTED_TYPES}")
    body = await _read_body(request, settings.max_upload_bytes)
    if not body:
        raise ClientError(400, f"empty request body: send {SUPPORTED_TYPES}")
    if not media:
        raise ClientError(415, f"missing Content-Type header: send {SUPPORTED_TYPES}")
    if is_multipart:
        return await _parse_multipart(request, body, settings)
    return _parse_json(body, settings)


def _too_many(n: int | None, settings: Settings) -> ClientError:
    count = f"{n} images" if n is not None else "too many images"
    return ClientError(413, f"{count} in one request; at most {settings.max_images} are allowed")


async def _parse_multipart(request: Request, body: bytes, settings: Settings) -> tuple[list[Upload], bool, bool]:
    async def replay():
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=settings.max_images, max_fields=16,
                             max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise _too_many(None, settings) from None
        raise ClientError(400, f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types
        raise ClientError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
    try:
        uploads: list[Upload] = []
        flags = {"resize": False, "include_path": False}
        names = []
        for name, value in form.multi_items():
            names.append(name)
            if name == "files":
                if not isinstance(value, UploadFile):
                    raise ClientError(422, "form field 'files' must be a file upload, not a text value")
                uploads.append(Upload(len(uploads), _clean_filename(value.filename), await value.read()))
            elif name in flags:
                if isinstance(value, UploadFile):
                    raise ClientError(422, f"form field {name!r} must be a text value (true/false), not a file")
                flags[name] = _parse_bool(name, value)
            else:
                raise ClientError(422, f"unknown form field {name[:60]!r}: send images in the field 'files' "
                                       f"(optional fields: 'resize', 'include_path')")
    finally:
        await form.close()
    if not uploads:
        found = f" (found: {', '.join(repr(n[:60]) for n in dict.fromkeys(names))})" if names else ""
        raise ClientError(422, f"no images: the multipart body has no 'files' field{found}")
    if len(uploads) > settings.max_images:
        raise _too_many(len(uploads), settings)
    return uploads, flags["resize"], flags["include_path"]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes, settings: Settings) -> tuple[list[Upload], bool, bool]:
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ClientError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise ClientError(400, f"malformed JSON body: {exc}") from None
    if isinstance(payload, dict) and isinstance(payload.get("images"), list) \
            and len(payload["images"]) > settings.max_images:
        raise _too_many(len(payload["images"]), settings)
    try:
        request = DetectRequest.model_validate(payload)
    except ValidationError as exc:
        detail, items = _summarise_validation(exc.errors(include_url=False, include_input=False),
                                              "invalid JSON body: ")
        raise ClientError(422, detail, errors=items) from None
    uploads = [Upload(i, _clean_filename(img.filename), base64=img.data) for i, img in enumerate(request.images)]
    return uploads, request.resize, request.include_path
