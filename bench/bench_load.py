"""Load test: many concurrent clients, valid and invalid requests mixed.

Starts the real service in a subprocess (``python -m pathguard.service.server``
on a free loopback port, configured by PATHGUARD_* variables) and lets
``--clients`` (default 64) closed-loop clients send a seeded mix of requests,
bounded by ``--requests`` and ``--seconds``:

* about 70 % valid: single-image and multi-image multipart requests and JSON
  (base64) requests of distinct real test images, some with include_path or
  resize; every file name is unique to its request and position;
* about 30 % invalid: garbage bytes, a truncated PNG, a wrong-size image, a
  decompression-bomb header, one bad image among good ones, malformed JSON,
  NaN in JSON, unknown JSON and form fields, malformed base64, too many
  images, a body over the upload limit, an empty body, an unsupported
  Content-Type, a missing 'files' field, the wrong method.

Invariants (any failing makes the exit status 1):

* no 5xx at all;
* every valid request is answered 200 with one result per image, in order:
  ``index`` and ``filename`` map back to the image sent at that position,
  and predicted class, label, adversarial flag, score, confidence, active
  fraction and layer deviations match ``Inspector.inspect`` run offline on
  the same pixels (relative tolerance ``--rtol``, default 1e-4, absolute 1e-4);
  nothing lost (no transport error, no other status) and nothing mixed up;
* every invalid request gets its documented 4xx with a JSON ``detail``
  (and, for a per-image error, the ``index`` of the bad image);
* the server's RSS (VmRSS of /proc/<pid>/status) grows by at most
  ``--max-rss-growth-mb`` between a warmed-up start and the end;
* the server is still ready afterwards.

Printed: requests/s, p50/p99 latency, statuses per request kind, 5xx,
lost, mismatches, RSS before / peak / after.  ``--json`` writes it all.

Usage:

    .venv/bin/python bench/bench_load.py [--bundle B] [--clients 64] [--requests 2000] [--seconds 60]
        [--max-rss-growth-mb 200] [--threads N] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import random
import struct
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_service import (  # noqa: E402
    ServerProcess, as_tensor, client_sessions, load_images, machine_info, multipart_body, percentile, png_bytes,
)

from pathguard.detector.bundle import DEFAULT_BUNDLE  # noqa: E402

VALID_SHARE = 0.7
DEFAULT_MAX_UPLOAD = 256 * 1024  # small, so that an over-limit body is cheap to send


# ------------------------------------------------------------------ requests

@dataclass
class Planned:
    """One request to send and what its answer must be."""

    kind: str
    method: str
    content: bytes | None
    headers: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    # valid requests: (image id, file name) per position; invalid: the expected statuses
    images: list[tuple[int, str]] | None = None
    include_path: bool = False
    expected_status: tuple[int, ...] = (200,)
    expected_index: int | None = None  # per-image errors: the bad image's position

    @property
    def valid(self) -> bool:
        return self.images is not None


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims a huge size, with a tiny payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 65))
            + png_chunk(b"IEND", b""))


def json_request(items: list[dict], **flags) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"images": items, **flags}).encode(), {"content-type": "application/json"}


class Planner:
    """A seeded sequence of requests: ~70 % valid, ~30 % invalid."""

    def __init__(self, pngs: list[bytes], wrong_size_png: bytes, max_images: int, max_upload: int,
                 seed: int) -> None:
        self.pngs = pngs
        self.wrong_size_png = wrong_size_png
        self.max_images = max_images
        self.max_upload = max_upload
        self.rng = random.Random(seed)
        self.count = 0
        self.invalid_kinds = [
            ("garbage-bytes", self._garbage), ("truncated-png", self._truncated), ("wrong-size", self._wrong_size),
            ("bomb-header", self._bomb), ("one-bad-among-good", self._one_bad), ("malformed-json", self._bad_json),
            ("nan-json", self._nan_json), ("unknown-json-field", self._unknown_json_field),
            ("unknown-form-field", self._unknown_form_field), ("bad-base64", self._bad_base64),
            ("too-many-files", self._too_many_files), ("too-many-json", self._too_many_json),
            ("over-upload-limit", self._over_limit), ("empty-body", self._empty),
            ("unsupported-type", self._unsupported_type), ("no-files-field", self._no_files),
            ("bad-flag", self._bad_flag), ("wrong-method", self._wrong_method),
        ]

    def next(self) -> Planned:
        self.count += 1
        if self.rng.random() < VALID_SHARE:
            return self._valid()
        kind, make = self.rng.choice(self.invalid_kinds)
        planned = make()
        planned.kind = kind
        return planned

    # ---------------------------------------------------------- valid

    def _pick(self, n: int) -> list[tuple[int, str]]:
        ids = self.rng.sample(range(len(self.pngs)), n)
        return [(i, f"r{self.count}-p{pos}-img{i}.png") for pos, i in enumerate(ids)]

    def _valid(self) -> Planned:
        roll = self.rng.random()
        include_path = self.rng.random() < 0.15
        resize = self.rng.random() < 0.1  # same-size images: resize changes nothing
        if roll < 0.45:
            kind, picked = "valid-multipart-1", self._pick(1)
        elif roll < 0.75:
            kind, picked = "valid-multipart-n", self._pick(self.rng.randint(2, min(8, self.max_images)))
        else:
            kind, picked = "valid-json", self._pick(self.rng.randint(1, min(4, self.max_images)))
        if kind.startswith("valid-multipart"):
            fields = {}
            params = {}
            if include_path:
                (fields if self.rng.random() < 0.5 else params)["include_path"] = "true"
            if resize:
                fields["resize"] = "true"
            content, headers = multipart_body([(name, self.pngs[i]) for i, name in picked], fields)
            return Planned(kind, "POST", content, headers, params, picked, include_path)
        items = []
        for i, name in picked:
            data = base64.b64encode(self.pngs[i]).decode()
            if self.rng.random() < 0.2:
                data = "data:image/png;base64," + data
            items.append({"data": data, "filename": name})
        content, headers = json_request(items, include_path=include_path, resize=resize)
        return Planned(kind, "POST", content, headers, {}, picked, include_path)

    # -------------------------------------------------------- invalid

    def _files(self, files: list[tuple[str, bytes]], fields: dict | None = None, status=(422,),
               index: int | None = None) -> Planned:
        content, headers = multipart_body(files, fields)
        return Planned("", "POST", content, headers, expected_status=status, expected_index=index)

    def _good(self) -> tuple[str, bytes]:
        return "good.png", self.pngs[self.rng.randrange(len(self.pngs))]

    def _garbage(self) -> Planned:
        return self._files([("garbage.png", self.rng.randbytes(self.rng.randint(1, 2000)))], index=0)

    def _truncated(self) -> Planned:
        # Cut inside the pixel data: Pillow decodes a PNG that lacks only its last ~20 bytes
        # (IEND, the IDAT CRC, the zlib checksum) to the full image, so such a cut may be answered 200.
        png = self.pngs[self.rng.randrange(len(self.pngs))]
        return self._files([("cut.png", png[: self.rng.randint(8, len(png) - 32)])], index=0)

    def _wrong_size(self) -> Planned:
        return self._files([("big.png", self.wrong_size_png)], index=0)

    def _bomb(self) -> Planned:
        return self._files([("bomb.png", bomb_png())], index=0)

    def _one_bad(self) -> Planned:
        n = self.rng.randint(2, min(6, self.max_images))
        bad = self.rng.randrange(n)
        files = [self._good() if i != bad else ("bad.png", b"not an image at all") for i in range(n)]
        return self._files(files, index=bad)

    def _bad_json(self) -> Planned:
        return Planned("", "POST", b'{"images": [{"data": "iVBOR', {"content-type": "application/json"},
                       expected_status=(400,))

    def _nan_json(self) -> Planned:
        data = base64.b64encode(self._good()[1]).decode()
        return Planned("", "POST", f'{{"images": [{{"data": "{data}"}}], "resize": NaN}}'.encode(),
                       {"content-type": "application/json"}, expected_status=(400,))

    def _unknown_json_field(self) -> Planned:
        content, headers = json_request([{"data": base64.b64encode(self._good()[1]).decode()}], colour="blue")
        return Planned("", "POST", content, headers, expected_status=(422,))

    def _unknown_form_field(self) -> Planned:
        return self._files([self._good()], {"threshold": "0.5"})

    def _bad_base64(self) -> Planned:
        content, headers = json_request([{"data": "@@not base64@@", "filename": "b64.png"}])
        return Planned("", "POST", content, headers, expected_status=(422,), expected_index=0)

    def _too_many_files(self) -> Planned:
        return self._files([self._good() for _ in range(self.max_images + 1)], status=(413,))

    def _too_many_json(self) -> Planned:
        item = {"data": base64.b64encode(self._good()[1]).decode()}
        content, headers = json_request([item] * (self.max_images + 1))
        return Planned("", "POST", content, headers, expected_status=(413,))

    def _over_limit(self) -> Planned:
        return self._files([("huge.png", b"\x89PNG" + b"\x00" * (self.max_upload + 10))], status=(413,))

    def _empty(self) -> Planned:
        return Planned("", "POST", b"", {"content-type": "application/json"}, expected_status=(400,))

    def _unsupported_type(self) -> Planned:
        return Planned("", "POST", self._good()[1], {"content-type": "image/png"}, expected_status=(415,))

    def _no_files(self) -> Planned:
        return self._files([], {"resize": "true"})

    def _bad_flag(self) -> Planned:
        return self._files([self._good()], {"resize": "maybe"})

    def _wrong_method(self) -> Planned:
        return Planned("", "GET", None, {}, expected_status=(405,))


# ------------------------------------------------------------------ checking

@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    valid_latencies_s: list[float] = field(default_factory=list)
    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: int = 0
    lost: int = 0
    mismatches: int = 0
    wrong_status: int = 0
    bad_error_body: int = 0
    transport_errors: int = 0
    client_cpu_s: float = 0.0
    valid_sent: int = 0
    images_checked: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


def close(a: float, b: float, rtol: float) -> bool:
    # Absolute floor: scores are standardised (threshold ~ 2.7) and a batch's
    # composition moves them by ~1e-5 in float arithmetic, which is relative
    # noise without bound for a score near 0.
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-4)


def compare(result: dict, expected, rtol: float) -> list[str]:
    """Differences between one answered result and the offline inspection."""
    problems = []
    if result.get("predicted_class") != expected.predicted_class or result.get("label") != expected.label:
        problems.append(f"class {result.get('predicted_class')}/{result.get('label')!r} != offline "
                        f"{expected.predicted_class}/{expected.label!r}")
    for name in ("score", "confidence", "active_fraction", "threshold"):
        got, want = result.get(name), getattr(expected, name)
        if not isinstance(got, (int, float)) or not close(got, want, rtol):
            problems.append(f"{name} {got!r} != offline {want!r}")
    deviations = result.get("layer_deviations")
    if not isinstance(deviations, list) or len(deviations) != len(expected.layer_deviations) or not all(
            close(g, w, rtol) for g, w in zip(deviations, expected.layer_deviations)):
        problems.append(f"layer_deviations {deviations!r} != offline {expected.layer_deviations!r}")
    if result.get("adversarial") != expected.adversarial:
        # A score within tolerance of the threshold may fall on either side of it.
        if not close(expected.score, expected.threshold, rtol):
            problems.append(f"adversarial {result.get('adversarial')!r} != offline {expected.adversarial!r}")
    return problems


def check_valid(planned: Planned, response: httpx.Response, offline: list, digest: str, widths: list[int],
                rtol: float, tally: Tally) -> None:
    if response.status_code != 200:
        tally.lost += 1
        tally.note(f"{planned.kind}: valid request answered {response.status_code}: {response.text[:200]}")
        return
    try:
        body = response.json()
        results = body["results"]
    except (ValueError, KeyError, TypeError):
        tally.lost += 1
        tally.note(f"{planned.kind}: 200 without a results list: {response.text[:200]}")
        return
    if body.get("model") != digest:
        tally.mismatches += 1
        tally.note(f"{planned.kind}: model {body.get('model')!r} != {digest!r}")
    if len(results) != len(planned.images):
        tally.lost += 1
        tally.note(f"{planned.kind}: {len(results)} results for {len(planned.images)} images")
        return
    for pos, ((image_id, name), result) in enumerate(zip(planned.images, results)):
        tally.images_checked += 1
        problems = []
        if result.get("index") != pos or result.get("filename") != name:
            problems.append(f"index/filename {result.get('index')!r}/{result.get('filename')!r} != {pos}/{name!r}")
        if result.get("resized") is not False:
            problems.append(f"resized {result.get('resized')!r} for an image of the right size")
        problems += compare(result, offline[image_id], rtol)
        paths = result.get("layer_paths")
        if planned.include_path:
            if not isinstance(paths, list) or [len(p) for p in paths] != widths:
                problems.append(f"layer_paths missing or of the wrong shape ({type(paths).__name__})")
        elif "layer_paths" in result:
            problems.append("layer_paths present without include_path")
        if problems:
            tally.mismatches += 1
            tally.note(f"{planned.kind} image {pos} ({name}): " + "; ".join(problems))


def check_invalid(planned: Planned, response: httpx.Response, tally: Tally) -> None:
    if response.status_code not in planned.expected_status:
        tally.wrong_status += 1
        tally.note(f"{planned.kind}: status {response.status_code}, expected {planned.expected_status}: "
                   f"{response.text[:200]}")
        return
    try:
        body = response.json()
        ok = isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"]
        if ok and planned.expected_index is not None:
            ok = body.get("index") == planned.expected_index
    except ValueError:
        ok = False
    if not ok:
        tally.bad_error_body += 1
        tally.note(f"{planned.kind}: error body without the expected detail/index: {response.text[:200]}")


# ------------------------------------------------------------------ run

async def run_load(url: str, planner: Planner, offline: list, digest: str, widths: list[int], clients: int,
                   requests: int, seconds: float, rtol: float) -> tuple[Tally, float]:
    tally = Tally()
    # One client (one keep-alive connection) per worker: a shared 64-connection
    # pool makes httpx itself the bottleneck (see bench_service.closed_loop).
    # The client's CPU time covers sending and checking the answers.
    sessions = client_sessions(url, clients)
    started = time.perf_counter()
    cpu = time.process_time()
    deadline = started + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while planner.count < requests and time.perf_counter() < deadline:
            planned = planner.next()
            tally.valid_sent += planned.valid
            t = time.perf_counter()
            try:
                response = await client.request(planned.method, "/detect", content=planned.content,
                                                headers=planned.headers, params=planned.params)
            except httpx.HTTPError as exc:
                tally.transport_errors += 1
                tally.lost += planned.valid
                tally.by_kind[planned.kind]["transport-error"] += 1
                tally.note(f"{planned.kind}: transport error {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t
            tally.latencies_s.append(elapsed)
            tally.by_kind[planned.kind][response.status_code] += 1
            if response.status_code >= 500:
                tally.server_errors += 1
                tally.lost += planned.valid
                tally.note(f"{planned.kind}: {response.status_code} {response.text[:200]}")
                continue
            if planned.valid:
                tally.valid_latencies_s.append(elapsed)
                check_valid(planned, response, offline, digest, widths, rtol, tally)
            else:
                check_invalid(planned, response, tally)

    try:
        await asyncio.gather(*(worker(c) for c in sessions))
        wall = time.perf_counter() - started
        tally.client_cpu_s = time.process_time() - cpu
    finally:
        for c in sessions:
            await c.aclose()
    return tally, wall


class RssSampler:
    """Samples the server's RSS every ``interval`` s on a thread; keeps the peak."""

    def __init__(self, server: ServerProcess, interval: float = 0.25) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.server.rss_mb())
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000, help="most requests in all (default 2000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="most seconds of load (default 60)")
    parser.add_argument("--images", type=int, default=512, help="distinct real images (default 512)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=200.0)
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD,
                        help=f"server's PATHGUARD_MAX_UPLOAD_BYTES (default {DEFAULT_MAX_UPLOAD})")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance against the offline scores")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the offline reference and of each server worker (default: torch's "
                             "own choice here; the server's own default)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="requests before the RSS baseline (default 2 x clients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the summary to this JSON file ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0:
        parser.error("--clients, --requests and --seconds must be positive")
    if args.images < 8:
        parser.error("--images must be at least 8 (multi-image requests use up to 8 distinct images)")

    from pathguard.detector.inspection import Inspector

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    inspector = Inspector.load(args.bundle)
    arrays = load_images(args.dataset, args.images, inspector.input_shape)
    tensors = as_tensor(arrays)
    offline = [ins for s in range(0, len(tensors), 64) for ins in inspector.inspect(tensors[s:s + 64])]
    pngs = [png_bytes(a) for a in arrays]
    c, h, w = inspector.input_shape
    wrong = np.zeros((h + 4, w + 4, c), dtype=np.uint8)
    wrong[2:-2, 2:-2] = arrays[0]
    digest = inspector.bundle.digest
    widths = list(inspector.model.gated_widths)

    info = machine_info(threads)
    print(f"machine: {info['machine']} {info['cpu']}, {info['usable_cpus']}/{info['cpu_count']} usable CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in info['loadavg'])}; torch {info['torch']}, {threads} threads")
    print(f"bundle: {Path(args.bundle).resolve()} (digest {digest[:12]}...); {len(pngs)} distinct images scored "
          f"offline")

    # the service's own defaults (inference workers, their threads) unless --threads is given
    server = ServerProcess(args.bundle, torch_threads=args.threads, max_upload_bytes=args.max_upload_bytes)
    with server:
        limits = httpx.get(server.url + "/model", timeout=10).json()["limits"]
        print(f"server pid {server.pid} on {server.url}: max_images {limits['max_images']}, max_upload_bytes "
              f"{limits['max_upload_bytes']}; {args.clients} clients, at most {args.requests} requests or "
              f"{args.seconds:g} s, ~{VALID_SHARE:.0%} valid")
        warmup = args.warmup if args.warmup is not None else 2 * args.clients
        warm_planner = Planner(pngs, png_bytes(wrong), limits["max_images"], limits["max_upload_bytes"],
                               args.seed + 1)
        warm, _ = asyncio.run(run_load(server.url, warm_planner, offline, digest, widths, args.clients, warmup,
                                       args.seconds, args.rtol))
        time.sleep(0.5)
        rss_before = server.rss_mb()
        planner = Planner(pngs, png_bytes(wrong), limits["max_images"], limits["max_upload_bytes"], args.seed)
        with RssSampler(server) as sampler:
            tally, wall = asyncio.run(run_load(server.url, planner, offline, digest, widths, args.clients,
                                               args.requests, args.seconds, args.rtol))
        time.sleep(0.5)
        rss_after = server.rss_mb()
        try:
            still_ready = httpx.get(server.url + "/ready", timeout=10).status_code == 200
        except httpx.HTTPError:
            still_ready = False
        exit_status = server.stop()

    sent = len(tally.latencies_s) + tally.transport_errors
    growth = rss_after - rss_before
    summary = {
        "machine": info, "bundle": str(Path(args.bundle).resolve()), "digest": digest,
        "clients": args.clients, "requests": sent, "valid_requests": tally.valid_sent,
        "invalid_requests": sent - tally.valid_sent, "images_checked": tally.images_checked,
        "wall_s": wall, "requests_per_s": sent / wall if wall else 0.0,
        "client_cores": tally.client_cpu_s / wall if wall else 0.0,
        "p50_ms": 1000 * percentile(tally.latencies_s, 50), "p99_ms": 1000 * percentile(tally.latencies_s, 99),
        "valid_p50_ms": 1000 * percentile(tally.valid_latencies_s, 50),
        "valid_p99_ms": 1000 * percentile(tally.valid_latencies_s, 99),
        "server_errors_5xx": tally.server_errors, "lost": tally.lost, "mismatches": tally.mismatches,
        "wrong_status": tally.wrong_status, "bad_error_body": tally.bad_error_body,
        "transport_errors": tally.transport_errors,
        "warmup_failures": warm.server_errors + warm.lost + warm.mismatches + warm.wrong_status + warm.bad_error_body,
        "rss_before_mb": rss_before, "rss_peak_mb": max(sampler.peak, rss_after), "rss_after_mb": rss_after,
        "rss_growth_mb": growth, "max_rss_growth_mb": args.max_rss_growth_mb,
        "still_ready": still_ready, "server_exit_status": exit_status,
        "statuses_by_kind": {k: {str(s): n for s, n in sorted(v.items(), key=lambda x: str(x[0]))}
                             for k, v in sorted(tally.by_kind.items())},
        "examples": tally.examples + [f"(warm-up) {e}" for e in warm.examples],
    }
    failures = []
    if tally.server_errors or warm.server_errors:
        failures.append(f"{tally.server_errors + warm.server_errors} responses were 5xx")
    if tally.lost or tally.mismatches or warm.lost or warm.mismatches:
        failures.append(f"{tally.lost + warm.lost} valid requests lost, {tally.mismatches + warm.mismatches} "
                        "answers mixed up or not matching the offline scores")
    if tally.wrong_status or tally.bad_error_body or warm.wrong_status or warm.bad_error_body:
        failures.append(f"{tally.wrong_status + warm.wrong_status} invalid requests got an unexpected status, "
                        f"{tally.bad_error_body + warm.bad_error_body} an error body without detail/index")
    if tally.transport_errors:
        failures.append(f"{tally.transport_errors} transport errors")
    if growth > args.max_rss_growth_mb:
        failures.append(f"server RSS grew by {growth:.1f} MB (limit {args.max_rss_growth_mb:g} MB)")
    if not still_ready:
        failures.append("the server was not ready after the load")
    if tally.valid_sent == 0:
        failures.append("no valid request was sent")
    summary["failures"] = failures
    summary["passed"] = not failures

    print(f"\n{sent} requests ({tally.valid_sent} valid, {sent - tally.valid_sent} invalid; "
          f"{tally.images_checked} images checked against the offline scores) in {wall:.1f} s")
    print(f"  throughput:      {summary['requests_per_s']:.1f} requests/s (the client used "
          f"{summary['client_cores']:.2f} CPU cores)")
    print(f"  latency:         p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms "
          f"(valid only: p50 {summary['valid_p50_ms']:.1f} ms, p99 {summary['valid_p99_ms']:.1f} ms)")
    print(f"  5xx:             {tally.server_errors}")
    print(f"  lost:            {tally.lost} (transport errors {tally.transport_errors})")
    print(f"  mismatches:      {tally.mismatches}")
    print(f"  wrong 4xx:       {tally.wrong_status} (error bodies without detail/index: {tally.bad_error_body})")
    print(f"  server RSS:      {rss_before:.1f} MB -> {rss_after:.1f} MB (peak {summary['rss_peak_mb']:.1f} MB), "
          f"growth {growth:+.1f} MB (limit {args.max_rss_growth_mb:g} MB)")
    print(f"  after the load:  ready {still_ready}; exit status on SIGTERM {exit_status}")
    print("  statuses by request kind:")
    for kind, statuses in summary["statuses_by_kind"].items():
        print(f"    {kind:<20} " + ", ".join(f"{s}: {n}" for s, n in statuses.items()))
    for example in summary["examples"]:
        print(f"  ! {example}")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
