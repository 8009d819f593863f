#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the detection service on the
# bundled default model (http://127.0.0.1:8000, docs at /docs).
# Settings come from PATHGUARD_* variables (README); extra arguments go to
# `pathguard serve` (e.g. --host 0.0.0.0 --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pathguard serve "$@"
