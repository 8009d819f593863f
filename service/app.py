"""The PathGuard HTTP service.

``create_app(settings)`` builds the FastAPI app from its parts; the bundle
is loaded (its manifest verified first) and warmed up in the app's lifespan,
so a server either serves a whole, verified model or does not start.

    state.py         ServiceState and the lifespan (load, warm-up, drain)
    dependencies.py  the state, the API key, readiness (FastAPI dependencies)
    errors.py        ClientError and the exception handlers
    body.py          parsing and decoding the /detect body
    responses.py     inspections -> response bodies
    routes.py        the endpoints

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

The contract in full: docs/contracts.md (HTTP contract).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .docs import install_docs
from .errors import install_error_handlers
from .metrics import MetricsMiddleware, ServiceMetrics
from .routes import router
from .schemas import DetectRequest
from .settings import Settings
from .state import BundleError, ServiceState, lifespan

__all__ = ["BundleError", "create_app"]

DESCRIPTION = (
    "Adversarial-image detection from the calculation paths of a decoupled network.\n\n"
    "POST images to **/detect** (multipart field `files`, or JSON with base64 data). Every "
    "error is a JSON `{\"detail\": ...}` that says what is wrong; one unusable image makes the "
    "whole request fail with a 4xx naming it. When an API key is configured, send it as "
    "`X-API-Key: <key>` or `Authorization: Bearer <key>`.")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pathguard")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics(settings.batch_size)
    app = FastAPI(title="PathGuard", version=_version(), description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_docs(app)  # /docs and /redoc from local files (docs.py)
    app.state.pathguard = ServiceState(settings, metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(router)
    app.openapi = lambda: openapi_schema(app)
    return app


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema plus ``DetectRequest``, which /detect's hand-written
    request body refers to (the route parses its body itself)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request_schema = DetectRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(request_schema.pop("$defs", {}))
    components["DetectRequest"] = request_schema
    app.openapi_schema = schema
    return schema
