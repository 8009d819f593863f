#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. .ci/run calls this.
# The container test needs podman, runc and debootstrap, the replica failover test haproxy, the HTTP
# benchmark test wrk: installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHGUARD_SYSTEM_PACKAGES="podman runc debootstrap wrk haproxy ${PATHGUARD_SYSTEM_PACKAGES:-}" bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
