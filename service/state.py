"""What one app serves, and its lifespan.

``ServiceState`` (kept on ``app.state.pathguard``) holds the settings, the
metrics and, once loaded, the inspector, the micro-batcher and the image
spec.  ``lifespan(app)`` loads the bundle (its manifest verified first, and
the pinned digest checked), starts the batcher, runs one warm-up pass on
each inference worker, freezes the start-up heap (``freeze_startup_heap``)
and only then marks the state ready; on shutdown it marks it draining and
lets the batcher finish what is queued.  A bundle that
cannot be served raises ``BundleError``, so the server does not start.

Inference runs, by default (``inference_process``), in separate worker
processes (spawned, so they share no GIL with the event loop), each of which
loads the same bundle, refuses any other digest, and ignores SIGINT (Ctrl-C
reaches the whole process group; the server drains first and then stops
them).  Otherwise it runs on one thread of this process.

How many workers, and how many torch threads each (``inference_workers``,
``worker_threads``): one single-thread worker per usable core, at most
``MAX_DEFAULT_WORKERS``.  Every pass has ``forward_chunk`` images, and a
pass of 8 gains little from a second intra-op thread, while two
single-thread processes running whole passes side by side answered 1.6-2.3x
the images/s of one on 32-image requests and 1.2-1.3x on single images
(``bench/bench_http.py --compare inference_workers=1``, service/README.md).
Every worker computes the same passes with the same thread count, so an
image's answer does not depend on which worker computed it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
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

# Default ceiling on inference worker processes: each holds its own copy of
# the model and torch (about 300 MB); beyond a few, batches of single-image
# traffic are too small to keep more busy.
MAX_DEFAULT_WORKERS = 4
# The unit in which queued images are shared out between free workers: a
# forward chunk larger than this must not let one worker take a whole short
# queue (with forward_chunk=16 and pieces of 16, 16 single-image connections
# kept one of two workers idle: 0.80x the requests/s, reports/bench/http-chunk16.txt).
SHARE_PIECE = 8
# How long a worker's warm-up waits for the others to load the bundle.
WARM_UP_TIMEOUT_S = 300.0


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
        inspector = await run_in_threadpool(Inspector.load, settings.bundle, settings.forward_chunk or None,
                                            settings.small_passes, settings.engine)
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
_WORKER_BARRIER = None
_WORKER_GC_FREEZE = True


def _worker_init(bundle: str, digest: str, chunk: int | None, threads: int | None,
                 barrier=None, gc_freeze: bool = True, small_passes: bool = True, engine: str = "auto") -> None:
    """In the inference process: load the bundle the server verified (the
    same digest, or refuse) and keep its inspector (and the barrier every
    worker's warm-up meets at, and whether it freezes its start-up heap)."""
    global _WORKER_INSPECTOR, _WORKER_BARRIER, _WORKER_GC_FREEZE
    _WORKER_BARRIER, _WORKER_GC_FREEZE = barrier, gc_freeze
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    inspector = Inspector.load(bundle, chunk, small_passes, engine)
    if inspector.bundle.digest != digest:
        raise ArtifactError(f"{bundle}: digest changed under the server ({inspector.bundle.digest} is not "
                            f"{digest})")
    _WORKER_INSPECTOR = inspector


def _worker_infer(images: np.ndarray, include_path: bool) -> list[Inspection]:
    """In the inference process: one batch, (N, C, H, W) float32."""
    return _WORKER_INSPECTOR.inspect(torch.from_numpy(images), include_path=include_path)


def _worker_warm_up(images: np.ndarray) -> tuple[int, int]:
    """In each inference process once at start: one pass, the start-up heap
    frozen (``freeze_startup_heap``), then wait at the barrier until every
    worker has made its own (so each of them takes exactly one warm-up call,
    and a worker that cannot start fails the start-up instead of the first
    requests).  The warm-up's lone image also measures which pass sizes give
    the same bits (``Inspector.pass_sizes``).  Returns the worker's pid, how
    many objects it froze and its pass sizes."""
    _worker_infer(images, True)
    frozen = freeze_startup_heap() if _WORKER_GC_FREEZE else 0
    if _WORKER_BARRIER is not None:
        _WORKER_BARRIER.wait(timeout=WARM_UP_TIMEOUT_S)
    return os.getpid(), frozen, _WORKER_INSPECTOR.pass_sizes()


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now (torch, the model, the
    app) out of the garbage collector's reach (``gc.freeze``); returns how
    many objects are frozen.

    A full (generation-2) collection walks every tracked object, and after
    start-up there are a few hundred thousand of them, nearly all immortal in
    practice.  Under 16 single-image connections the event loop met about
    two such collections per 15 s, each over 25 ms (150-190 ms seen), every
    request in flight waiting them out: that was the p99 latency.  With the
    start-up heap frozen none took over 25 ms and the p99 halved
    (``bench/bench_http.py --compare gc_freeze=false``, which prints the
    server's collections from ``pathguard_gc_pause_seconds``;
    service/README.md).  Objects made later are collected as usual; frozen
    ones that become garbage are freed by their reference counts, only
    cycles among them would stay.  ``Settings.gc_freeze`` switches it off."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _pack(images: torch.Tensor) -> np.ndarray:
    """A batch as sent to the worker process: a NumPy array pickles as plain
    bytes (a tensor would go through torch's shared-memory reducer)."""
    return images.contiguous().numpy()


def inference_workers(settings: Settings) -> int:
    """Inference worker processes: ``inference_workers`` when set; otherwise
    one per usable core, at most ``MAX_DEFAULT_WORKERS`` (one without
    ``inference_process``)."""
    if settings.inference_workers:
        return settings.inference_workers
    if not settings.inference_process:
        return 1
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cpus()))


def worker_threads(settings: Settings) -> int | None:
    """Torch threads of each inference worker process: ``torch_threads`` when
    set; otherwise torch's own default less one core (which the event loop
    keeps), shared between the workers, at least one each.  On two cores
    that is one thread: two intra-op threads fought the event loop for the
    cores (their spin-waits burned a second core even for one client) and
    answered single-image requests a third slower (``bench/bench_http.py
    --set torch_threads=2``; service/README.md)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, min(torch.get_num_threads(), usable_cpus() - 1) // inference_workers(settings))


async def start_batcher(inspector: Inspector, settings: Settings, metrics: ServiceMetrics) -> MicroBatcher:
    """A running batcher around ``inspector.inspect``, in worker processes or
    on a worker thread (``settings.inference_process``), each worker warmed
    up by one forward pass (the batcher closed again if one fails)."""
    workers = inference_workers(settings)
    if settings.inference_process:
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_worker_init,
            initargs=(str(inspector.bundle.path), inspector.bundle.digest, inspector.chunk,
                      worker_threads(settings), context.Barrier(workers), settings.gc_freeze,
                      inspector.small_passes, inspector.engine))
        infer, pack = _worker_infer, _pack
        warm_up, warm_up_args = _worker_warm_up, (np.zeros((1, *inspector.input_shape), dtype=np.float32),)
    else:
        def infer(images: torch.Tensor, include_path: bool) -> list[Inspection]:
            return inspector.inspect(images, include_path=include_path)

        executor, pack = None, None
        warm_up, warm_up_args = infer, (torch.zeros((1, *inspector.input_shape)), True)

    batcher = MicroBatcher(
        infer, max_batch=settings.batch_size, max_wait_s=settings.batch_wait_s,
        max_queue=settings.queue_size, coalesce=settings.batching, retry_after=settings.retry_after_s,
        on_batch=metrics.observe_batch, executor=executor, pack=pack, workers=workers,
        # pieces of at most SHARE_PIECE images (one forward chunk if smaller), so free workers can
        # share a request; without batching a request stays one call, as documented
        piece=min(inspector.chunk or SHARE_PIECE, SHARE_PIECE, settings.batch_size) if settings.batching else None)
    await batcher.start()
    try:
        # one warm-up per worker (each process meets the others at a barrier)
        ready = await asyncio.gather(*(batcher.run_in_worker(warm_up, *warm_up_args) for _ in range(workers)))
    except Exception as exc:
        await batcher.close()
        raise BundleError(f"cannot serve bundle {settings.bundle}: warm-up pass failed: {exc}") from exc
    if settings.inference_process:
        log.info("inference workers ready: %s", ", ".join(
            f"pid {pid} ({frozen} start-up objects frozen; {inspector.engine} engine, passes of {sizes} images)"
            for pid, frozen, sizes in ready))
    else:
        log.info("inference ready: %s engine, passes of %s images", inspector.engine, inspector.pass_sizes())
    return batcher


def _inference_summary(settings: Settings) -> str:
    if not settings.inference_process:
        return "inference on a thread of this process"
    workers, threads = inference_workers(settings), worker_threads(settings)
    return f"{workers} inference worker process{'es' if workers > 1 else ''}, {threads} torch thread(s) each"


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
    if settings.gc_freeze:
        freeze_startup_heap()
    state.metrics.watch_gc()
    state.ready = True
    log.info("serving bundle %s (digest %s..., score %s, threshold %.4g); %s; API key %s",
             inspector.bundle.path.name, inspector.bundle.digest[:12], detector.name,
             detector.threshold_, _inference_summary(settings), "required" if settings.api_key else "not required")


async def drain(state: ServiceState) -> None:
    """Stop answering as ready and finish the images already queued."""
    state.ready = False
    state.draining = True
    state.metrics.unwatch_gc()
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
