"""The error contract: every error is JSON ``{"detail": "<what is wrong>"}``.

``ClientError`` is how the service's own code refuses a request (a 4xx, or a
503 with Retry-After); ``install_error_handlers(app)`` turns it, FastAPI's
validation errors, Starlette's 404/405 and anything unexpected (500) into
that JSON.  ``ERROR_RESPONSES`` documents the error statuses in the OpenAPI
schema.  The statuses are listed in ``pathguard.service.app`` and in
docs/contracts.md (HTTP contract).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import ErrorResponse

log = logging.getLogger("pathguard.service")

ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "body not parseable (empty, malformed JSON or multipart)",
        401: "API key missing or wrong",
        413: "body or image count over the limits",
        415: "unsupported Content-Type",
        422: "invalid request or unusable image (the detail names it)",
        503: "busy, timed out or shutting down; retry after Retry-After seconds",
    }.items()
}


class ClientError(Exception):
    """A client mistake: becomes a JSON 4xx (or 503) response."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = {k: v for k, v in extra.items() if v is not None}


def error_response(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    body = {"detail": detail, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse(body, status_code=status, headers=headers)


def summarise_validation(errors: list[dict], prefix: str = "") -> tuple[str, list[dict]]:
    """Pydantic errors as one readable detail (the first five) and a list of
    ``{"loc", "msg", "type"}`` (the first twenty)."""
    items = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
        items.append({"loc": loc, "msg": err.get("msg", "invalid"), "type": err.get("type", "")})
    shown = "; ".join(f"{e['loc']}: {e['msg']}" for e in items[:5])
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    return f"{prefix}{shown}{more}", items[:20]


async def client_error(request: Request, exc: ClientError) -> JSONResponse:
    return error_response(exc.status, exc.detail, exc.headers, **exc.extra)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail, items = summarise_validation(list(exc.errors()), "invalid request: ")
    return error_response(422, detail, errors=items)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.url.path} (see /docs)"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
    return error_response(exc.status_code, str(detail), getattr(exc, "headers", None))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientError, client_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
