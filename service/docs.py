"""The interactive API docs, served from the installed packages: no CDN.

FastAPI's own /docs and /redoc pages load Swagger UI and ReDoc from a CDN
(and ReDoc its fonts from Google), so on a machine without internet they are
blank.  ``install_docs(app)`` serves both from local files instead:

    GET /docs                  Swagger UI ("Try it out"), from /static/docs/
    GET /docs/oauth2-redirect  Swagger UI's OAuth2 helper page
    GET /redoc                 ReDoc, from /static/docs/
    /static/docs/...           swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png

The files come from the ``fastapi-offline`` package (a dependency; MIT), which
ships Swagger UI 5 and ReDoc 2 builds; only its files are used, not its
``FastAPIOffline`` app.  (``swagger-ui-bundle`` on PyPI ships Swagger UI 4,
which cannot render the OpenAPI 3.1 documents FastAPI writes, and no ReDoc.)
No page references another host: Swagger UI's online validator badge is off
and ReDoc is served without Google Fonts.  tests/test_service_docs.py fetches
every page and every asset it references.

``install_docs`` also adds what the model expects of an image
(``schemas.EXPECTED_INPUT``) to the API description at the top of both pages.
The app must be created with ``docs_url=None, redoc_url=None``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from .schemas import EXPECTED_INPUT

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
STATIC_URL = "/static/docs"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# Swagger UI settings beyond FastAPI's defaults: no online validator (its
# badge is an image from validator.swagger.io); show each request's duration.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None, "displayRequestDuration": True}


def assets_dir() -> Path:
    """The folder holding ``ASSETS`` (fastapi-offline's static files)."""
    try:
        import fastapi_offline
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("the API docs need the package 'fastapi-offline' (pip install fastapi-offline)") from exc
    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline at {folder} lacks {', '.join(missing)}; "
                           f"reinstall it (pip install --force-reinstall fastapi-offline)")
    return folder


def install_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc (and their assets) from local files, and say
    in the API description what input the model expects."""
    app.description = f"{app.description}\n\n{EXPECTED_INPUT}" if app.description else EXPECTED_INPUT
    app.mount(STATIC_URL, StaticFiles(directory=assets_dir()), name="docs-static")
    parameters = {**SWAGGER_UI_PARAMETERS, **(app.swagger_ui_parameters or {})}

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=f"{base}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{STATIC_URL}/favicon.png",
            oauth2_redirect_url=f"{base}{OAUTH2_REDIRECT_URL}", swagger_ui_parameters=parameters)

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(
            openapi_url=f"{base}{app.openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{STATIC_URL}/favicon.png", with_google_fonts=False)
