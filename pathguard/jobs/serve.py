"""`pathguard serve`: options for the main CLI.

    configure(parser)  adds --bundle, --host, --port (and a few tuning options);
                       each overrides its PATHGUARD_* environment variable
    run(args) -> int   builds Settings, checks the bundle's manifest, serves;
                       returns the exit status (0 after a graceful stop,
                       2 for bad settings or a bad bundle, 3 if startup failed)
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=None, help="bundle directory (env PATHGUARD_BUNDLE; default: the shipped one)")
    parser.add_argument("--host", default=None, help="address to listen on (env PATHGUARD_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (env PATHGUARD_PORT; default 8000, 0 = any free)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                        help="most images per forward pass (env PATHGUARD_BATCH_SIZE; default 64)")
    parser.add_argument("--batching", dest="batching", action=argparse.BooleanOptionalAction, default=None,
                        help="coalesce concurrent requests into one forward pass (env PATHGUARD_BATCHING; default on)")
    parser.add_argument("--log-level", dest="log_level", default=None,
                        choices=("critical", "error", "warning", "info", "debug"))


def settings_from_args(args: argparse.Namespace):
    from .settings import Settings

    overrides = {name: getattr(args, name, None)
                 for name in ("bundle", "host", "port", "batch_size", "batching", "log_level")}
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pathguard.detector.artifacts import ArtifactError, verify_manifest

    from .server import serve

    try:
        settings = settings_from_args(args)
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
