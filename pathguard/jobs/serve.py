"""`pathguard serve`: the HTTP service on a bundle.

Each option overrides its PATHGUARD_* environment variable (service/settings.py
holds every setting, its default and its check); an option left out keeps
the environment's value or the default.  Exit status: 0 after a graceful
stop, 2 for bad settings or a bad bundle, 3 if start-up failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from pydantic import ValidationError

from pathguard.detector.artifacts import ArtifactError, verify_manifest
from pathguard.service.server import serve
from pathguard.service.settings import Settings

from .config import option

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class Config:
    bundle: str | None = option(None, "bundle directory (env PATHGUARD_BUNDLE; default: the shipped one)", kind=str)
    host: str | None = option(None, "address to listen on (env PATHGUARD_HOST; default 127.0.0.1)", kind=str)
    port: int | None = option(None, "port (env PATHGUARD_PORT; default 8000, 0 = any free)", kind=int)
    batch_size: int | None = option(None, "most images per forward pass (env PATHGUARD_BATCH_SIZE; default 64)",
                                    kind=int)
    batching: bool | None = option(None, "coalesce concurrent requests into one forward pass "
                                   "(env PATHGUARD_BATCHING; default on)", kind=bool)
    log_level: str | None = option(None, "log level (env PATHGUARD_LOG_LEVEL; default info)", kind=str,
                                   choices=LOG_LEVELS)


def settings_from(cfg: Config) -> Settings:
    given = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def run(cfg: Config) -> int:
    try:
        settings = settings_from(cfg)
    except ValidationError as exc:
        print(f"pathguard serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        # Fail early with a one-line message; the app verifies again when it loads.
        verify_manifest(settings.bundle)
    except ArtifactError as exc:
        print(f"pathguard serve: error: cannot serve bundle {settings.bundle}: {exc}", file=sys.stderr)
        return 2
    return serve(settings)
