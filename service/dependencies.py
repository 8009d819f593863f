"""FastAPI dependencies of the routes, as module-level functions (so a test
can replace any of them with ``app.dependency_overrides``).

    get_state                  the app's ServiceState (``app.state.pathguard``)
    require_key                401 unless the configured API key is sent
                               (X-API-Key or ``Authorization: Bearer``;
                               constant-time compare); open when none is set
    require_key_for_metrics    the same, for /metrics, only with protect_metrics
    serving                    the loaded model (inspector, batcher, spec), or
                               503 + Retry-After while loading or draining
                               (``loaded_model``, called directly by /detect)
"""

from __future__ import annotations

import hmac
from typing import NamedTuple

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from pathguard.detector.inspection import Inspector

from .batching import MicroBatcher
from .errors import ClientError
from .images import ImageSpec
from .settings import Settings
from .state import ServiceState

key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, if configured")
bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")


async def get_state(request: Request) -> ServiceState:
    return request.app.state.pathguard


def check_key(settings: Settings, x_api_key: str | None, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 unless the key configured in ``settings`` (if any) was sent."""
    if settings.api_key is None:
        return
    supplied = x_api_key if x_api_key is not None else (credentials.credentials if credentials else None)
    if not supplied:
        raise ClientError(401, "missing API key: send it in the X-API-Key header or as "
                               "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    expected = settings.api_key.get_secret_value().encode("utf-8")
    if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), expected):
        raise ClientError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})


async def require_key(state: ServiceState = Depends(get_state),
                      x_api_key: str | None = Security(key_header),
                      credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    check_key(state.settings, x_api_key, credentials)


async def require_key_for_metrics(state: ServiceState = Depends(get_state),
                                  x_api_key: str | None = Security(key_header),
                                  credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    if state.settings.protect_metrics:
        check_key(state.settings, x_api_key, credentials)


class Serving(NamedTuple):
    inspector: Inspector
    batcher: MicroBatcher
    spec: ImageSpec


def loaded_model(state: ServiceState) -> Serving:
    """The loaded model; 503 (with Retry-After) until it is loaded and
    warmed up, and once the server is shutting down."""
    if not state.ready or state.batcher is None or state.inspector is None:
        reason = "server is shutting down" if state.draining else "model is not loaded yet"
        raise ClientError(503, reason, {"Retry-After": str(state.settings.retry_after_s)})
    return Serving(state.inspector, state.batcher, state.spec)


async def serving(state: ServiceState = Depends(get_state)) -> Serving:
    """``loaded_model`` as a dependency (/model).  POST /detect calls
    ``loaded_model`` itself: every dependency costs FastAPI work on each
    request, and /detect is the hot path."""
    return loaded_model(state)
