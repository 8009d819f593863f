"""Running the service: ``serve(settings)`` runs uvicorn with ``create_app``.

Shutdown: on SIGTERM or SIGINT uvicorn stops accepting connections, lets the
requests in flight finish (up to ``inference_timeout_s`` + 5 s), then the
app's lifespan drains the micro-batcher.  ``serve`` then returns 0, so a
graceful stop is a clean exit (uvicorn alone would re-raise the signal after
shutting down and the process would die by it).

``python -m pathguard.service.server`` serves with the settings from the
environment (``PATHGUARD_*``).

Speed: uvicorn runs on uvloop with the httptools parser when they are
installed (they are dependencies), else on asyncio with h11.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
import threading

import uvicorn

from .app import create_app
from .settings import Settings

log = logging.getLogger("pathguard.service")


def configure_logging(level: str) -> None:
    """Send the service's own log lines (``pathguard.*``) to stderr beside uvicorn's."""
    logger = logging.getLogger("pathguard")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [pathguard] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def event_loop_and_parser() -> tuple[str, str]:
    """uvloop and httptools when installed (dependencies; several times
    less CPU per request than asyncio's loop and h11), else the pure-Python
    ones."""
    return ("uvloop" if _importable("uvloop") else "asyncio",
            "httptools" if _importable("httptools") else "h11")


def build_server(settings: Settings):
    loop, http = event_loop_and_parser()
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
        lifespan="on", timeout_graceful_shutdown=int(settings.inference_timeout_s) + 5,
        server_header=False, proxy_headers=False, loop=loop, http=http,
    )
    return uvicorn.Server(config)


def serve(settings: Settings | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0 after a graceful
    stop, 3 if the app failed to start, e.g. a tampered bundle)."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    server = build_server(settings)
    received: list[int] = []

    def _note(sig, frame):  # uvicorn re-raises the signal it handled; we only note it
        received.append(sig)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals are main-thread only
        previous = {sig: signal.signal(sig, _note) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 3 when the app's startup fails
        log.error("PathGuard did not start (see the error above)")
        return exc.code if isinstance(exc.code, int) else 3
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        log.error("PathGuard did not start (see the error above)")
        return 3
    if received:
        log.info("stopped after %s", signal.Signals(received[0]).name)
    return 0


def main() -> int:
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"pathguard serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
