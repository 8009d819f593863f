"""Micro-batching: concurrent requests share one forward pass.

Requests ``submit`` their images (a tensor (n, C, H, W)) and await their own
results.  A collector task on the event loop takes queued images in arrival
order and groups them into batches of at most ``max_batch`` images, waiting
at most ``max_wait_s`` after the first one for more to arrive, and hands each
batch to an inference worker, so the event loop never blocks.  A request is
cut into pieces of at most ``piece`` images (``max_batch`` by default); a
request's pieces stay in order, and its results come back in its own order.

``workers`` batches may be in flight at once, one per inference worker (by
default one: a single worker thread, since torch already uses the cores).
A batch is formed only when a worker is free, so under load the next batch
fills with everything that arrived while the workers were busy.  With more
than one worker free, the queued images are shared out between them (in
multiples of ``piece``): a lone 32-image request keeps two workers busy
instead of one.

Backpressure: at most ``max_queue`` images may wait for inference (queued or
in a batch still forming); a request that would exceed that is refused at
once with ``Overloaded`` instead of growing the queue.  ``submit(timeout=)``
bounds queueing + inference time with ``InferenceTimeout``.  Both carry a
``retry_after`` hint for the HTTP layer (503 + Retry-After).

``coalesce=False`` switches batching off: each request is its own forward
pass (still bounded by ``max_batch`` per pass), for benchmarks.

Where inference runs: by default on one worker thread of this process.  An
``executor`` (e.g. a ``ProcessPoolExecutor`` with ``workers`` processes) runs
it elsewhere instead; ``pack`` then turns each batch's tensor into what is
sent there (e.g. a NumPy array, which pickles as plain bytes).  A worker
process does not share this process's GIL: under load the event loop's
Python work and the inference pass's Python glue (one GIL round trip per
torch op) no longer wait for each other, which made a pass 2-3 times slower
than in-process.

``close()`` stops new submissions and drains: everything already accepted is
still inferred and answered (the batches in flight included) before the
workers stop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("pathguard.service")

InferFn = Callable[[torch.Tensor, bool], Sequence[Any]]
BatchHook = Callable[[int, float], None]


class Unavailable(RuntimeError):
    """The batcher cannot take this request now (HTTP 503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """The queue is full."""


class InferenceTimeout(Unavailable):
    """The request was not answered within its time limit."""


class ShuttingDown(Unavailable):
    """The batcher is closing and takes no new work."""


@dataclass
class _Chunk:
    images: torch.Tensor
    include_path: bool
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.images)


class MicroBatcher:
    def __init__(self, infer: InferFn, *, max_batch: int = 64, max_wait_s: float = 0.002,
                 max_queue: int = 1024, coalesce: bool = True, retry_after: int = 1,
                 on_batch: BatchHook | None = None, executor: Executor | None = None,
                 pack: Callable[[torch.Tensor], Any] | None = None, workers: int = 1,
                 piece: int | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        if workers < 1 or (piece is not None and not 1 <= piece <= max_batch):
            raise ValueError("workers must be >= 1 and piece between 1 and max_batch")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.coalesce = coalesce
        self.retry_after = retry_after
        self.on_batch = on_batch
        self.workers = workers
        self.piece = piece or max_batch
        self._busy = 0  # batches in flight
        self._worker_free: asyncio.Event | None = None
        self._running: set[asyncio.Task] = set()
        self._queue: collections.deque[_Chunk] = collections.deque()
        self._pending = 0  # images accepted but not yet handed to the worker
        self._closing = False
        self._broken = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: Executor | None = executor
        self.pack = pack
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._worker_free = asyncio.Event()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pathguard-infer")
        self._task = asyncio.create_task(self._collect(), name="pathguard-batcher")

    async def run_in_worker(self, fn: Callable, *args):
        """Run ``fn`` on the inference worker (e.g. a warm-up pass)."""
        if self._executor is None:
            raise RuntimeError("batcher not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing and not self._broken

    @property
    def pending(self) -> int:
        return self._pending

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what was accepted, stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.warning("batcher did not drain within %.1f s; cancelling", timeout)
                self._task.cancel()
                for task in list(self._running):
                    task.cancel()
        for chunk in self._queue:
            if not chunk.future.done():
                chunk.future.set_exception(ShuttingDown("server is shutting down", self.retry_after))
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ submit

    async def submit(self, images: torch.Tensor, include_path: bool = False,
                     timeout: float | None = None) -> list:
        """Results of ``infer`` for ``images``, in their order."""
        if self._task is None or self._closing:
            raise ShuttingDown("server is shutting down" if self._closing else "batcher not started",
                               self.retry_after)
        if self._task.done() or self._broken:
            raise Unavailable("inference worker has stopped", self.retry_after)
        n = len(images)
        if n == 0:
            return []
        if self._pending + n > self.max_queue:
            raise Overloaded(f"server busy: {self._pending} images already waiting (limit {self.max_queue}); "
                             f"retry after {self.retry_after} s", self.retry_after)
        loop = asyncio.get_running_loop()
        chunks = [_Chunk(images[s:s + self.piece], include_path, loop.create_future())
                  for s in range(0, n, self.piece)]
        self._queue.extend(chunks)
        self._pending += n
        self._wakeup.set()
        # One chunk (the usual case) is awaited directly; several are gathered.
        waiting = chunks[0].future if len(chunks) == 1 else asyncio.gather(*(c.future for c in chunks))
        try:
            parts = await asyncio.wait_for(waiting, timeout)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"inference did not finish within {timeout:g} s; retry after "
                                   f"{self.retry_after} s", self.retry_after) from None
        finally:
            for c in chunks:  # cancelled chunks are skipped by the collector
                if not c.future.done():
                    c.future.cancel()
        if len(chunks) == 1:
            return parts
        return [result for part in parts for result in part]

    # --------------------------------------------------------- collector

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._pending -= len(self._queue.popleft())

    def _queued_images(self) -> int:
        return sum(len(c) for c in self._queue if not c.future.done())

    async def _collect(self) -> None:
        try:
            while True:
                self._drop_cancelled()
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                while self._busy >= self.workers:  # form the batch when a worker can take it
                    self._worker_free.clear()
                    await self._worker_free.wait()
                batch, size = await self._form_batch()
                self._pending -= size
                if batch:
                    self._busy += 1
                    task = asyncio.create_task(self._run(batch), name="pathguard-batch")
                    self._running.add(task)
                    task.add_done_callback(self._batch_done)
        finally:
            if self._running:  # drain: the batches in flight are answered too
                await asyncio.gather(*self._running, return_exceptions=True)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._busy -= 1
        self._worker_free.set()

    async def _form_batch(self) -> tuple[list[_Chunk], int]:
        """The next batch: queued pieces in arrival order, up to ``max_batch``
        images (or this worker's share of the queue when other workers are
        free too), waiting up to ``max_wait_s`` for more to arrive."""
        loop = asyncio.get_running_loop()
        limit = self.max_batch
        free = self.workers - self._busy
        if free > 1 and self.coalesce:
            share = -(-self._queued_images() // free)
            limit = min(self.max_batch, max(self.piece, -(-share // self.piece) * self.piece))
        batch: list[_Chunk] = []
        size = 0
        deadline = loop.time() + self.max_wait_s
        while True:
            self._drop_cancelled()
            while self._queue and size + len(self._queue[0]) <= limit:
                chunk = self._queue.popleft()
                batch.append(chunk)
                size += len(chunk)
                if not self.coalesce:
                    break
                self._drop_cancelled()
            full = size >= limit or (self._queue and not self._queue[0].future.done())
            if full or not self.coalesce or self._closing:
                return batch, size
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch, size
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return batch, size

    async def _run(self, batch: list[_Chunk]) -> None:
        live = [c for c in batch if not c.future.done()]
        if not live:
            return
        images = torch.cat([c.images for c in live]) if len(live) > 1 else live[0].images
        include_path = any(c.include_path for c in live)
        started = time.perf_counter()
        try:
            payload = self.pack(images) if self.pack is not None else images
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.infer, payload, include_path)
        except Exception as exc:  # noqa: BLE001 - handed to each waiting caller
            log.exception("inference failed for a batch of %d images", len(images))
            if isinstance(exc, BrokenProcessPool):  # the worker process died: not ready any more
                self._broken = True
                exc = Unavailable("the inference worker has stopped", self.retry_after)
            for c in live:
                if not c.future.done():
                    c.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        if self.on_batch is not None:
            try:
                self.on_batch(len(images), seconds)
            except Exception:  # noqa: BLE001 - metrics must never break inference
                log.exception("batch hook failed")
        start = 0
        for c in live:
            part = list(results[start:start + len(c)])
            start += len(c)
            if not c.include_path:
                for r in part:
                    if hasattr(r, "layer_paths") and include_path:
                        r.layer_paths = None
            if not c.future.done():
                c.future.set_result(part)
