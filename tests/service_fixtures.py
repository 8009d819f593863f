"""Shared helpers for the service tests: a small real bundle (trained and
fitted once per test session), real Fashion-MNIST test images encoded as
image files, and real uvicorn servers on free local ports.

Nothing is mocked: the bundle is trained by pathguard.jobs.train, its detector
fitted on real paths, and every request goes over a real socket.
"""

from __future__ import annotations

import io
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)

_LOCK = threading.Lock()
_CACHE: dict[str, object] = {}


# ------------------------------------------------------------------ bundle

def build_service_bundle(root: Path) -> Path:
    """A tiny real bundle (1 + 1 epochs on 2000 images) with a detector fitted
    on the paths of 1000 other training images and calibrated on 300 more
    (no attacks, so it takes ~30 s on one core).  Built once per session."""
    with _LOCK:
        if "bundle" in _CACHE:
            return _CACHE["bundle"]
        from pathguard.detector.bundle import load_bundle, save_detector
        from pathguard.detector.data import load_dataset
        from pathguard.detector.detectors import make_detector
        from pathguard.detector.paths import extract_paths
        from pathguard.jobs.train import Config, train

        # vgg-small without distillation: a quick bundle (the default recipe is vgg7)
        path = train(Config(output=str(root / "bundle"), epochs_plain=1, epochs_decoupled=1,
                            limit_train=2000, limit_test=300, progress=False, architecture="vgg-small",
                            distill_weight=0.0))
        bundle = load_bundle(path)
        train_set = load_dataset("fashion-mnist", "train")
        model = bundle.decoupled
        detector = make_detector("layer-gauss-conf")
        detector.fit(extract_paths(model, train_set.images[2000:3000]))
        detector.calibrate(extract_paths(model, train_set.images[3000:3300]))
        save_detector(path, detector, {"note": "service test bundle, fitted without attacks"})
        _CACHE["bundle"] = Path(path)
        return Path(path)


def fmnist_images(n: int = 64) -> torch.Tensor:
    """The first n real Fashion-MNIST test images, (n, 1, 28, 28) in [0, 1]."""
    with _LOCK:
        if "test" not in _CACHE:
            from pathguard.detector.data import load_dataset

            _CACHE["test"] = load_dataset("fashion-mnist", "test").images[:256].clone()
    return _CACHE["test"][:n]


def offline_inspector(bundle: Path):
    with _LOCK:
        key = f"inspector:{bundle}"
        if key not in _CACHE:
            from pathguard.detector.inspection import Inspector

            _CACHE[key] = Inspector.load(bundle)
        return _CACHE[key]


def copy_bundle(bundle: Path, destination: Path) -> Path:
    shutil.copytree(bundle, destination)
    return destination


# ------------------------------------------------------------------ images

def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, H, W) float in [0, 1] -> (H, W) uint8 (exact for dataset images)."""
    return (image[0].numpy() * 255).round().astype(np.uint8)


def encode(array_or_image, fmt: str = "PNG", **options) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_of(image: torch.Tensor) -> bytes:
    return encode(to_uint8(image), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: the shape of
    a decompression bomb (or of a zero-size image) without the payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (min(width, 64) + 1))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


# ------------------------------------------------------------------ server

class LiveServer:
    """create_app(settings) served by uvicorn in a thread on a free port."""

    def __init__(self, settings) -> None:
        import uvicorn

        from pathguard.service.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, lifespan="on", log_level="warning",
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except SystemExit:  # uvicorn's way of saying "startup failed"
            pass

    def start(self, timeout: float = 60.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
