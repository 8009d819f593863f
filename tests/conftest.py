"""Shared fixtures: small real files (IDX, CIFAR-10 binary, PNG), a real
local HTTP server, the real Fashion-MNIST test split and a tiny architecture.

Nothing here mocks a part of the code under test: every fixture produces
real bytes on disk or a real server socket.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pathguard.detector.models import Architecture

# The machine is small and shared: one thread keeps the tests predictable.
torch.set_num_threads(1)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian
    uint32 dimensions, then the raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.fixture
def write_idx():
    """write_idx(path, array, gz=False) -> Path: write real IDX bytes."""

    def _write(path: Path, array: np.ndarray, gz: bool = False) -> Path:
        data = idx_bytes(array)
        path = Path(path)
        if gz:
            path = path.with_name(path.name + ".gz") if not path.name.endswith(".gz") else path
            data = gzip.compress(data)
        path.write_bytes(data)
        return path

    return _write


@pytest.fixture
def idx_arrays():
    """A tiny deterministic image/label pair: 7 images of 28x28, labels 0..9."""
    rng = np.random.default_rng(1234)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    images[0, 0, 0] = 0
    images[0, 0, 1] = 255
    labels = np.array([0, 9, 3, 3, 1, 5, 7], dtype=np.uint8)
    return images, labels


# ------------------------------------------------------------- CIFAR-10


def cifar_records(labels: np.ndarray, images: np.ndarray) -> bytes:
    """CIFAR-10 binary records: 1 label byte then 3072 pixel bytes
    (1024 red, 1024 green, 1024 blue, each row-major 32x32)."""
    out = bytearray()
    for label, image in zip(labels, images):
        out.append(int(label))
        out += np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return bytes(out)


@pytest.fixture
def cifar_dir(tmp_path):
    """A directory holding data_batch_1..5.bin (3 records each) and
    test_batch.bin (2 records); returns (dir, train (labels, images),
    test (labels, images))."""
    rng = np.random.default_rng(99)
    root = tmp_path / "cifar"
    root.mkdir()
    train_labels, train_images = [], []
    for i in range(1, 6):
        labels = rng.integers(0, 10, size=3, dtype=np.uint8)
        images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
        (root / f"data_batch_{i}.bin").write_bytes(cifar_records(labels, images))
        train_labels.append(labels)
        train_images.append(images)
    test_labels = np.array([4, 9], dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
    (root / "test_batch.bin").write_bytes(cifar_records(test_labels, test_images))
    return (
        root,
        (np.concatenate(train_labels), np.concatenate(train_images)),
        (test_labels, test_images),
    )


# ----------------------------------------------------------- HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    return root


def _serve(directory: Path):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def http_server(http_root):
    """A real HTTP server on 127.0.0.1 (free port) serving ``http_root``;
    yields its base URL (ending in '/')."""
    server, thread = _serve(http_root)
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def serve_directory():
    """serve_directory(path) -> base URL: serve any directory for the test."""
    servers = []

    def _start(directory: Path) -> str:
        server, thread = _serve(Path(directory))
        servers.append((server, thread))
        host, port = server.server_address[:2]
        return f"http://{host}:{port}/"

    yield _start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------ real data


@pytest.fixture(scope="session")
def fmnist_test():
    """The real Fashion-MNIST test split (Debian's dataset-fashion-mnist)."""
    from pathguard.detector.data import load_dataset

    return load_dataset("fashion-mnist", "test")


# ---------------------------------------------------------------- models


@pytest.fixture
def tiny_arch() -> Architecture:
    return Architecture("tiny", 1, 28, 10, (4, "M", 8, 8, "M"), mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory):
    """One small real bundle with a fitted detector, shared by every service test
    module (building it takes ~20 s). Tests that damage a bundle copy it first."""
    from service_fixtures import build_service_bundle

    return build_service_bundle(tmp_path_factory.mktemp("service-bundle"))


# ---------------------------------------------------------------- container image

CITEST_IMAGE = "localhost/pathguard:citest"


@pytest.fixture(scope="session")
def citest_image():
    """The deployable image, built once per session by docker/build.sh (as a user
    builds it) and shared by tests/test_container.py and tests/test_deploy_kube.py:
    a build without podman's layer cache takes minutes.  Yields (tag, build seconds, podman
    environment); the tag is removed at the end of the session (its cached
    layers stay, for the next build)."""
    import os
    import shutil
    import subprocess
    import time

    assert shutil.which("podman"), "podman is not installed: scripts/test.sh installs it (apt-get install podman runc)"
    env = dict(os.environ, CONTAINERS_CONF=str(REPO_ROOT / "docker" / "containers.conf"))
    started = time.time()
    subprocess.run(["bash", "docker/build.sh", CITEST_IMAGE], cwd=REPO_ROOT, env=env, check=True,
                   stdout=subprocess.PIPE)
    yield CITEST_IMAGE, time.time() - started, env
    subprocess.run(["podman", "rmi", "-f", CITEST_IMAGE], env=env, check=False, capture_output=True)
