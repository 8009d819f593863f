#!/usr/bin/env bash
# Idempotent set-up for a fresh machine (Debian/Ubuntu-like, Python >= 3.11):
# a virtual environment with a CPU build of torch, the project, torchattacks
# (--no-deps: it declares torchvision, which it never imports), and the
# Fashion-MNIST Debian package when it is missing and apt is available.
# Re-running it is fast and changes nothing once everything is in place.
#
# Overridable: PATHGUARD_VENV (default .venv), PATHGUARD_TORCH (default
# torch==2.13.0; e.g. "torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu"
# elsewhere), PYTHON (default python3), PATHGUARD_SYSTEM_PACKAGES (extra apt
# packages, used by the test script for the container test).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PATHGUARD_VENV:-.venv}
TORCH_SPEC=${PATHGUARD_TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist
APT_PACKAGES="${PATHGUARD_SYSTEM_PACKAGES:-}"
[ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || APT_PACKAGES="dataset-fashion-mnist $APT_PACKAGES"

missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing system packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: warning: apt-get not available; install$missing yourself (or pass --data-root)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

# Skip pip entirely when nothing it depends on has changed.
stamp="$VENV/.pathguard-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$(echo "$TORCH_SPEC" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
  # torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
  pip_install $TORCH_SPEC
  pip_install -e ".[test]"
  pip_install --no-deps torchattacks==3.5.1
  echo "$want" > "$stamp"
fi
