"""Prometheus metrics of one app (its own registry, so several apps can live
in one process, e.g. in tests), and the ASGI middleware that counts requests.

    pathguard_requests_total{endpoint,method,status}   requests answered
    pathguard_request_duration_seconds{endpoint}        latency histogram
    pathguard_images_scored_total                       images inspected
    pathguard_images_flagged_total                      of which flagged adversarial
    pathguard_batch_size                                images per forward pass (histogram)
    pathguard_inference_seconds                         forward pass + scoring time (histogram)
    pathguard_queue_images                              images waiting for inference now
    pathguard_rejected_total{reason}                    503s: overloaded, timeout, shutting_down
    pathguard_model_info{digest,name,score}             the loaded bundle (value 1)
    pathguard_gc_pause_seconds{generation}              the server process's garbage collections
                                                        (histogram; each one stalls the event loop)

Endpoint labels are the known routes; any other path counts as "other", so a
client cannot blow up the label cardinality.
"""

from __future__ import annotations

import gc
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

KNOWN_ENDPOINTS = frozenset({"/detect", "/health", "/ready", "/model", "/metrics", "/docs", "/redoc",
                             "/openapi.json", "/docs/oauth2-redirect"})
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(float(b))
        b *= 2
    buckets.append(float(max_batch))
    return tuple(buckets)


class ServiceMetrics:
    def __init__(self, max_batch: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pathguard_requests", "HTTP requests answered",
                                ("endpoint", "method", "status"), registry=r)
        self.latency = Histogram("pathguard_request_duration_seconds", "HTTP request latency",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=r)
        self.images_scored = Counter("pathguard_images_scored", "images inspected", registry=r)
        self.images_flagged = Counter("pathguard_images_flagged", "images flagged as adversarial", registry=r)
        self.batch_size = Histogram("pathguard_batch_size", "images per forward pass",
                                    buckets=_batch_buckets(max_batch), registry=r)
        self.inference_seconds = Histogram("pathguard_inference_seconds", "time of one forward pass + scoring",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.queue_images = Gauge("pathguard_queue_images", "images waiting for inference", registry=r)
        self.rejected = Counter("pathguard_rejected", "requests refused with 503", ("reason",), registry=r)
        self.model_info = Gauge("pathguard_model_info", "the loaded bundle", ("name", "digest", "score"),
                                registry=r)
        self.gc_pause = Histogram("pathguard_gc_pause_seconds", "garbage collections of the server process",
                                  ("generation",), buckets=GC_BUCKETS, registry=r)
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)

    def watch_gc(self) -> None:
        """Time this process's garbage collections (until ``unwatch_gc``)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: count every HTTP response by endpoint and status."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        method = scope.get("method", "")
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, method if method in _METHODS else "OTHER",
                                         str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
