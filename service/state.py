"""What one app serves, and its lifespan.

``ServiceState`` (kept on ``app.state.pathguard``) holds the settings, the
metrics and, once loaded, the inspector, the micro-batcher and the image
spec.  ``lifespan(app)`` loads the bundle (its manifest verified first, and
the pinned digest checked), starts the batcher, runs one warm-up pass on the
inference worker and only then marks the state ready; on shutdown it marks
it draining and lets the batcher finish what is queued.  A bundle that
cannot be served raises ``BundleError``, so the server does not start.

The inference worker is, by default (``inference_process``), one separate
process (spawned, so it shares no GIL with the event loop): it loads the
same bundle, refuses any other digest, and ignores SIGINT (Ctrl-C reaches
the whole process group; the server drains first and then stops it).
Otherwise it is one thread of this process.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from pathguard.detector.artifacts import ArtifactError
from pathguard.detector.devices import usable_cpus
from pathguard.detector.inspection import Inspection, Inspector

from .batching import MicroBatcher
from .images import ImageSpec, configure_pillow
from .metrics import ServiceMetrics
from .responses import model_info
from .settings import Settings

log = logging.getLogger("pathguard.service")


class BundleError(RuntimeError):
    """The bundle cannot be served (missing, tampered, incomplete)."""


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    inspector: Inspector | None = None
    batcher: MicroBatcher | None = None
    spec: ImageSpec | None = None
    ready: bool = False
    draining: bool = False
    model_info: dict = field(default_factory=dict)


def _check_provenance(inspector: Inspector, settings: Settings) -> None:
    """Refuse a bundle other than the pinned one.  (Detector files that the
    manifest does not cover are already refused by
    pathguard.detector.bundle.load_detector.)"""
    if settings.expected_digest and inspector.bundle.digest != settings.expected_digest:
        raise ArtifactError(f"{inspector.bundle.path}: digest {inspector.bundle.digest} is not the expected "
                            f"{settings.expected_digest}")


async def load_inspector(settings: Settings) -> Inspector:
    """The bundle's inspector, verified, pinned and of a servable input shape."""
    try:
        inspector = await run_in_threadpool(Inspector.load, settings.bundle, settings.forward_chunk or None)
        _check_provenance(inspector, settings)
    except (ArtifactError, ValueError, OSError) as exc:
        message = f"cannot serve bundle {settings.bundle}: {exc}"
        log.error(message)
        raise BundleError(message) from exc
    channels = inspector.input_shape[0]
    if channels not in (1, 3):
        raise BundleError(f"cannot serve bundle {settings.bundle}: {channels}-channel input is not supported")
    return inspector


# ------------------------------------------------------ the worker process

_WORKER_INSPECTOR: Inspector | None = None


def _worker_init(bundle: str, digest: str, chunk: int | None, threads: int | None) -> None:
    """In the inference process: load the bundle the server verified (the
    same digest, or refuse) and keep its inspector."""
    global _WORKER_INSPECTOR
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    inspector = Inspector.load(bundle, chunk)
    if inspector.bundle.digest != digest:
        raise ArtifactError(f"{bundle}: digest changed under the server ({inspector.bundle.digest} is not "
                            f"{digest})")
    _WORKER_INSPECTOR = inspector


def _worker_infer(images: np.ndarray, include_path: bool) -> list[Inspection]:
    """In the inference process: one batch, (N, C, H, W) float32."""
    return _WORKER_INSPECTOR.inspect(torch.from_numpy(images), include_path=include_path)


def _pack(images: torch.Tensor) -> np.ndarray:
    """A batch as sent to the worker process: a NumPy array pickles as plain
    bytes (a tensor would go through torch's shared-memory reducer)."""
    return images.contiguous().numpy()


def worker_threads(settings: Settings) -> int | None:
    """Torch threads of the inference worker process: ``torch_threads`` when
    set; otherwise torch's own default less one core, which the event loop
    keeps.  On two cores that is one thread: two intra-op threads fought the
    event loop for the cores (their spin-waits burned a second core even for
    one client) and answered single-image requests a third slower
    (``bench/bench_http.py --set torch_threads=2``; service/README.md)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, min(torch.get_num_threads(), usable_cpus() - 1))


async def start_batcher(inspector: Inspector, settings: Settings, metrics: ServiceMetrics) -> MicroBatcher:
    """A running batcher around ``inspector.inspect``, in a worker process or
    on a worker thread (``settings.inference_process``), warmed up by one
    forward pass there (closed again if that fails)."""
    if settings.inference_process:
        executor = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
            initargs=(str(inspector.bundle.path), inspector.bundle.digest, inspector.chunk,
                      worker_threads(settings)))
        infer, pack = _worker_infer, _pack
        warm_up = np.zeros((1, *inspector.input_shape), dtype=np.float32)
    else:
        def infer(images: torch.Tensor, include_path: bool) -> list[Inspection]:
            return inspector.inspect(images, include_path=include_path)

        executor, pack, warm_up = None, None, torch.zeros((1, *inspector.input_shape))

    batcher = MicroBatcher(
        infer, max_batch=settings.batch_size, max_wait_s=settings.batch_wait_s,
        max_queue=settings.queue_size, coalesce=settings.batching, retry_after=settings.retry_after_s,
        on_batch=metrics.observe_batch, executor=executor, pack=pack)
    await batcher.start()
    try:
        await batcher.run_in_worker(infer, warm_up, True)
    except Exception as exc:
        await batcher.close()
        raise BundleError(f"cannot serve bundle {settings.bundle}: warm-up pass failed: {exc}") from exc
    return batcher


async def load(state: ServiceState) -> None:
    """Load, check and warm up the bundle; then the state is ready."""
    settings = state.settings
    configure_pillow(settings.max_pixels)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    inspector = await load_inspector(settings)
    detector = inspector.detector
    state.inspector = inspector
    state.spec = ImageSpec(*inspector.input_shape, settings.max_pixels, settings.alpha_background)
    state.model_info = model_info(inspector, settings)
    state.metrics.model_info.labels(inspector.bundle.path.name, inspector.bundle.digest, detector.name).set(1)
    state.batcher = await start_batcher(inspector, settings, state.metrics)
    state.ready = True
    log.info("serving bundle %s (digest %s..., score %s, threshold %.4g); API key %s",
             inspector.bundle.path.name, inspector.bundle.digest[:12], detector.name,
             detector.threshold_, "required" if settings.api_key else "not required")


async def drain(state: ServiceState) -> None:
    """Stop answering as ready and finish the images already queued."""
    state.ready = False
    state.draining = True
    if state.batcher is None:
        return
    log.info("draining: finishing %d queued images", state.batcher.pending)
    await state.batcher.close(timeout=state.settings.inference_timeout_s + 5)
    log.info("stopped")


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServiceState = app.state.pathguard
    await load(state)
    try:
        yield
    finally:
        await drain(state)
