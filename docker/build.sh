#!/usr/bin/env bash
# Build the PathGuard image.  Usage: docker/build.sh [TAG]  (default localhost/pathguard:latest)
#
# 1. build/wheelhouse: every dependency wheel (CPU torch pinned by
#    PATHGUARD_TORCH, default torch==2.13.0) and their pins (requirements.txt),
#    downloaded on the host, where pip works; build/project: the project's own
#    wheel.  The image installs both with --no-index, in two layers.
# 2. The base image: with podman and no reachable registry, a Debian bookworm
#    minbase made by debootstrap and imported once (localhost/pathguard-base:bookworm);
#    otherwise debian:bookworm-slim.  Override with PATHGUARD_BASE_IMAGE.
# 3. The image itself, with podman (chroot isolation, runc, see
#    docker/containers.conf) or docker, whichever is installed (podman first;
#    PATHGUARD_CONTAINER_ENGINE=docker to force docker).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/pathguard:latest}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TORCH_SPEC=${PATHGUARD_TORCH:-torch==2.13.0}
ENGINE=${PATHGUARD_CONTAINER_ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}

[ -f bundles/fmnist-default/manifest.json ] || { echo "build: bundles/fmnist-default is missing" >&2; exit 1; }

# --- 1. wheelhouse: dependency wheels are kept while pyproject.toml and the
#     torch pin are unchanged; the project's own wheel is rebuilt every time.
want=$(cat pyproject.toml docker/build.sh | sha256sum | cut -c1-16)-$(echo "$TORCH_SPEC" | sha256sum | cut -c1-8)
if [ "$(cat build/wheelhouse/.stamp 2>/dev/null)" != "$want" ]; then
  rm -rf build/wheelhouse && mkdir -p build/wheelhouse
  echo "build: filling build/wheelhouse" >&2
  "$PY" -m pip wheel --disable-pip-version-check -q --wheel-dir build/wheelhouse $TORCH_SPEC . >&2
  # torchattacks declares torchvision and an old requests but imports neither.
  "$PY" -m pip download --disable-pip-version-check -q --no-deps -d build/wheelhouse torchattacks==3.5.1 >&2
  echo "$want" > build/wheelhouse/.stamp
fi
# The dependencies and the project go into separate image layers: the
# dependency layer (torch and the rest, pinned in requirements.txt) stays
# cached while only the project changes; the project's wheel is rebuilt
# every time into build/project.
rm -f build/wheelhouse/pathguard-*.whl
(cd build/wheelhouse && ls ./*.whl | grep -v -e '/torchattacks-' | sed -E 's#^\./([^-]+)-([^-]+)-.*#\1==\2#' \
  | sort > requirements.txt)
rm -rf build/project build/lib build/bdist* ./*.egg-info && mkdir -p build/project
"$PY" -m pip wheel --disable-pip-version-check -q --no-deps --wheel-dir build/project . >&2

# --- 2. base image
BASE=${PATHGUARD_BASE_IMAGE:-}
if [ -z "$BASE" ]; then
  if [ "$ENGINE" = podman ]; then
    BASE=localhost/pathguard-base:bookworm
    if ! podman image exists "$BASE"; then
      echo "build: making $BASE with debootstrap (once per machine)" >&2
      root=$(mktemp -d /tmp/pathguard-rootfs.XXXXXX)
      trap 'rm -rf "$root"' EXIT
      debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
      tar -C "$root" -c . | podman import - "$BASE" >/dev/null
      rm -rf "$root"; trap - EXIT
    fi
  else
    BASE=docker.io/library/debian:bookworm-slim
  fi
fi

# --- 3. image
echo "build: $ENGINE build $TAG from $BASE"
if [ "$ENGINE" = podman ]; then
  podman build --format docker --isolation chroot --pull=never --build-arg BASE_IMAGE="$BASE" -f docker/Dockerfile -t "$TAG" . >&2
else
  docker build --build-arg BASE_IMAGE="$BASE" -f docker/Dockerfile -t "$TAG" . >&2
fi
echo "$TAG"
