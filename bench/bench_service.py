"""Service throughput and latency vs the in-process batched forward (the ceiling).

Starts the real service (``python -m pathguard.service.server``, uvicorn on
loopback, in a subprocess so that the client and the server do not share a
GIL) on a bundle, once with micro-batching on and once with it off.  For each
concurrency (default 1, 16 and 64 closed-loop clients) it sends single-image
``POST /detect`` requests (real Fashion-MNIST test images as PNG, multipart)
for at most ``--requests`` requests or ``--seconds`` seconds, and measures
images/s (= requests/s), p50 and p99 latency.  In the same run it measures
the ceiling: ``Inspector.inspect`` in-process on batches of 64 images of the
same model, with the same number of torch threads as the server, with each
forward engine (dense and skipping; the faster counts); it is
measured before and after the service runs (the larger is used, both are
printed, so drift from other load on the machine shows).  The table gives
throughput / ceiling per setting.

The client is one asyncio loop with httpx.AsyncClient and pre-encoded
multipart bodies.  Its CPU use and the server's are measured per setting;
when the client uses most of a core, or the server cannot get the cores it
was given, the row is flagged: the client (or the machine) may then be the
bottleneck rather than the service.

Usage:

    .venv/bin/python bench/bench_service.py [--bundle B] [--clients 1 16 64] [--requests 2000]
        [--seconds 15] [--batching on off] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pathguard.detector.bundle import DEFAULT_BUNDLE  # noqa: E402
from pathguard.detector.devices import usable_cpus  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BOUNDARY = "pathguard-bench-boundary-7d1f0c"


# ------------------------------------------------------------------ images

def load_images(dataset: str, n: int, input_shape: tuple[int, int, int]) -> np.ndarray:
    """The first n test images of ``dataset`` as uint8 (n, H, W, C)."""
    from pathguard.detector.data import load_dataset

    images = load_dataset(dataset, "test").images[:n]
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise SystemExit(f"{dataset} test images have shape {tuple(images.shape[1:])}, the bundle expects "
                         f"{tuple(input_shape)}: pass --dataset matching the bundle")
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG file bytes (grey for C=1, RGB for C=3)."""
    from PIL import Image

    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def as_tensor(arrays: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, C) -> float32 (n, C, H, W) in [0, 1], exactly as the service decodes them."""
    return torch.from_numpy(arrays.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def multipart_body(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None,
                   boundary: str = BOUNDARY) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body (built once, so the client does little work per request)."""
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


# ------------------------------------------------------------------ server

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m pathguard.service.server`` in a subprocess on a free loopback
    port, configured through PATHGUARD_* (inherited PATHGUARD_* variables are dropped)."""

    def __init__(self, bundle: str | Path, host: str = "127.0.0.1", **settings) -> None:
        self.bundle = Path(bundle)
        self.host = host
        self.settings = {k: v for k, v in settings.items() if v is not None}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="pathguard-bench-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_")}
        env.update({"PATHGUARD_BUNDLE": str(self.bundle), "PATHGUARD_HOST": self.host,
                    "PATHGUARD_PORT": str(self.port), "PATHGUARD_LOG_LEVEL": "warning"})
        for key, value in self.settings.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            env[f"PATHGUARD_{key.upper()}"] = str(value)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        for attempt in range(3):  # the free port may be taken between probe and bind: retry
            self.port = free_port(self.host)
            self.proc = subprocess.Popen([sys.executable, "-m", "pathguard.service.server"], cwd=REPO_ROOT,
                                         env=self._env(), stdout=self.log, stderr=subprocess.STDOUT)
            if self._wait_ready(timeout):
                return self
            if "address already in use" not in self.log_tail().lower() or attempt == 2:
                break
        raise RuntimeError(f"the service did not become ready (exit {self.proc.poll()}):\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        return False

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-chars:].decode("utf-8", "replace")

    def rss_mb(self) -> float:
        """Resident set size (VmRSS of /proc/<pid>/status) in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS line")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all threads)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ client

@dataclass
class LoadResult:
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    client_cpu_s: float = 0.0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def client_sessions(url: str, n: int) -> list[httpx.AsyncClient]:
    """n clients of one keep-alive connection each (sharing one TLS context:
    each would otherwise load the CA store, though only plain HTTP is used)."""
    import ssl

    tls = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return [httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0, verify=tls) for _ in range(n)]


async def closed_loop(url: str, bodies: list[tuple[bytes, dict]], clients: int, requests: int,
                      seconds: float) -> LoadResult:
    """``clients`` workers, each sending one request after another on its own
    keep-alive connection, until ``requests`` were sent or ``seconds`` passed.

    Each worker has its own httpx.AsyncClient with one connection: one shared
    client with a 64-connection pool costs several times more client CPU per
    request at 64 workers (httpcore scans its pool for every request), enough
    to make the client the bottleneck."""
    result = LoadResult(0.0)
    counter = iter(range(requests))
    sessions = client_sessions(url, clients)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            body, headers = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                response = await client.post("/detect", content=body, headers=headers)
            except httpx.HTTPError:
                result.transport_errors += 1
                continue
            result.latencies_s.append(time.perf_counter() - t)
            result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1

    cpu = time.process_time()
    try:
        await asyncio.gather(*(worker(c) for c in sessions))
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu
    finally:
        for c in sessions:
            await c.aclose()
    return result


def _client_process(url: str, bodies: list[tuple[bytes, dict]], clients: int, requests: int, seconds: float,
                    start_at: float) -> tuple[LoadResult, float]:
    """One client process's share of the load, started at ``start_at`` (time.time())."""
    time.sleep(max(0.0, start_at - time.time()))
    started = time.time()
    return asyncio.run(closed_loop(url, bodies, clients, requests, seconds)), started


def run_load(url: str, bodies: list[tuple[bytes, dict]], clients: int, requests: int, seconds: float,
             pool=None, procs: int = 1) -> LoadResult:
    """The closed loop in this process, or split over ``procs`` client processes
    (``pool``) when one process's event loop could not keep up."""
    procs = max(1, min(procs, clients))
    if pool is None or procs == 1:
        return asyncio.run(closed_loop(url, bodies, clients, requests, seconds))
    start_at = time.time() + 0.3
    futures = [pool.submit(_client_process, url, bodies, clients // procs + (i < clients % procs),
                           requests // procs + (i < requests % procs), seconds, start_at) for i in range(procs)]
    parts = [f.result() for f in futures]
    merged = LoadResult(max(t + r.wall_s for r, t in parts) - min(t for _, t in parts))
    for part, _ in parts:
        merged.latencies_s += part.latencies_s
        merged.transport_errors += part.transport_errors
        merged.client_cpu_s += part.client_cpu_s
        for status, n in part.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + n
    return merged


# ------------------------------------------------------------------ ceiling

def measure_ceiling(inspector, images: torch.Tensor, batch: int, seconds: float, min_repeats: int = 3) -> dict:
    """Images/s of ``Inspector.inspect`` on batches of ``batch`` images, in-process."""
    chunks = [images[s:s + batch] for s in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    inspector.inspect(chunks[0])  # warm-up
    times = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < seconds:
        t = time.perf_counter()
        inspector.inspect(chunks[len(times) % len(chunks)])
        times.append(time.perf_counter() - t)
    n = len(chunks[0])
    return {"images_per_s": n / statistics.median(times), "batch": n, "repeats": len(times),
            "ms_per_batch_median": 1000 * statistics.median(times)}


def measure_best_ceiling(inspectors: list, images: torch.Tensor, batch: int, seconds: float) -> dict:
    """``measure_ceiling`` of each inspector (one per forward engine); the
    faster counts, with every engine's images/s kept under ``engines``."""
    figures = []
    for inspector in inspectors:
        figure = measure_ceiling(inspector, images, batch, seconds)
        figure["engine"] = inspector.engine
        figures.append(figure)
    best = dict(max(figures, key=lambda f: f["images_per_s"]))
    best["engines"] = {f["engine"]: f["images_per_s"] for f in figures}
    return best


def engines_text(ceiling: dict) -> str:
    return ", ".join(f"{engine} {value:.1f}" for engine, value in ceiling["engines"].items())


# ------------------------------------------------------------------ main

def machine_info(threads: int) -> dict:
    # the cores the service itself counts as usable (affinity mask, cgroup CPU quota)
    affinity = usable_cpus()
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu_model, "cpu_count": os.cpu_count(), "usable_cpus": affinity,
            "loadavg": list(os.getloadavg()), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads, "httpx": httpx.__version__}


def bottleneck_note(client_cores: float, server_cores: float, usable_cpus: int, procs: int = 1) -> str:
    """Why a row's figure may not be the service's own limit: a client process
    (one event loop) busy more than half the time, or a client that needs more
    CPU than the server it loads."""
    notes = []
    if client_cores / procs > 0.5 or client_cores > server_cores:
        notes.append(f"client used {client_cores:.2f} cores: it may be the bottleneck")
    if client_cores + server_cores > 0.9 * usable_cpus:
        notes.append("client + server saturate the CPUs")
    return "; ".join(notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--dataset", default="fashion-mnist", help="test images to send (default fashion-mnist)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64], help="concurrencies (default 1 16 64)")
    parser.add_argument("--batching", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--requests", type=int, default=2000, help="most requests per setting (default 2000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="most seconds per setting (default 15)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="unmeasured requests per setting (default 2 per client)")
    parser.add_argument("--images", type=int, default=256, help="distinct images to cycle through (default 256)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server and of the ceiling (default: torch's own choice here)")
    parser.add_argument("--batch-size", type=int, default=64, help="ceiling batch and server PATHGUARD_BATCH_SIZE")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="time per ceiling measurement")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="spread the clients over this many client processes (default 1; raise it when the "
                             "table says the client may be the bottleneck and the machine has spare cores)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file ('-' = stdout)")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.client_procs < 1 or args.requests < 1 or args.seconds <= 0:
        parser.error("--clients, --requests and --seconds must be positive")

    from pathguard.detector.inspection import Inspector

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    # the ceiling with each forward engine (its default chunks); the faster counts
    ceiling_inspectors = [Inspector.load(args.bundle, engine=engine) for engine in ("dense", "sparse")]
    inspector = ceiling_inspectors[0]
    arrays = load_images(args.dataset, max(args.images, args.batch_size), inspector.input_shape)
    tensors = as_tensor(arrays)
    bodies = [multipart_body([(f"test-{i}.png", png_bytes(a))]) for i, a in enumerate(arrays[: args.images])]

    info = machine_info(threads)
    print(f"machine: {info['machine']} {info['cpu']}, {info['usable_cpus']}/{info['cpu_count']} usable CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in info['loadavg'])}")
    print(f"python {info['python']}, torch {info['torch']} ({threads} threads for the server and the ceiling), "
          f"httpx {info['httpx']}")
    print(f"bundle: {Path(args.bundle).resolve()} (digest {inspector.bundle.digest[:12]}...), "
          f"detector {inspector.detector.name}")
    print(f"each setting: at most {args.requests} single-image requests or {args.seconds:g} s; "
          f"{args.client_procs} client process(es), one keep-alive connection per client")

    ceiling_before = measure_best_ceiling(ceiling_inspectors, tensors, args.batch_size, args.ceiling_seconds)
    print(f"ceiling (in-process Inspector.inspect, batch {ceiling_before['batch']}): "
          f"{ceiling_before['images_per_s']:.1f} images/s ({engines_text(ceiling_before)})")

    pool = None
    if args.client_procs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    rows = []
    try:
        for mode in args.batching:
            batching = mode == "on"
            # one inference worker with the ceiling's threads: like for like
            server = ServerProcess(args.bundle, batching=batching, batch_size=args.batch_size,
                                   torch_threads=threads, inference_workers=1)
            with server:
                for clients in args.clients:
                    warmup = args.warmup if args.warmup is not None else 2 * clients
                    if warmup:
                        run_load(server.url, bodies, clients, warmup, args.seconds, pool, args.client_procs)
                    cpu = server.cpu_seconds()
                    load = run_load(server.url, bodies, clients, args.requests, args.seconds, pool,
                                    args.client_procs)
                    server_cpu = server.cpu_seconds() - cpu
                    ok = load.statuses.get(200, 0)
                    row = {
                        "batching": mode, "clients": clients,
                        "requests": len(load.latencies_s) + load.transport_errors,
                        "ok": ok, "errors": len(load.latencies_s) - ok + load.transport_errors,
                        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
                        "wall_s": load.wall_s, "images_per_s": ok / load.wall_s if load.wall_s else 0.0,
                        "p50_ms": 1000 * percentile(load.latencies_s, 50),
                        "p99_ms": 1000 * percentile(load.latencies_s, 99),
                        "client_cores": load.client_cpu_s / load.wall_s if load.wall_s else 0.0,
                        "server_cores": server_cpu / load.wall_s if load.wall_s else 0.0,
                    }
                    row["note"] = bottleneck_note(row["client_cores"], row["server_cores"],
                                                  info["usable_cpus"] or 1, min(args.client_procs, clients))
                    rows.append(row)
                    print(f"  batching {mode:>3}, {clients:3d} clients: {row['images_per_s']:8.1f} images/s, "
                          f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms ({row['requests']} requests, "
                          f"{row['errors']} errors)", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    ceiling_after = measure_best_ceiling(ceiling_inspectors, tensors, args.batch_size, args.ceiling_seconds)
    ceiling = max(ceiling_before["images_per_s"], ceiling_after["images_per_s"])
    for row in rows:
        row["ratio"] = row["images_per_s"] / ceiling

    print()
    print(f"ceiling: {ceiling:.1f} images/s (before {ceiling_before['images_per_s']:.1f}, after "
          f"{ceiling_after['images_per_s']:.1f}; batch {args.batch_size}, {threads} threads; the faster engine "
          f"each time: {engines_text(ceiling_before)}; {engines_text(ceiling_after)})")
    header = (f"{'batching':>8} {'clients':>7} {'requests':>8} {'errors':>6} {'images/s':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'ratio':>6} {'client':>6} {'server':>6}  note")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['batching']:>8} {row['clients']:>7} {row['requests']:>8} {row['errors']:>6} "
              f"{row['images_per_s']:>9.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['ratio']:>6.3f} "
              f"{row['client_cores']:>6.2f} {row['server_cores']:>6.2f}  {row['note']}")
    print("ratio = service images/s / ceiling images/s; client, server = CPU cores used during the setting")
    if info["loadavg"][0] > 0.5 * (info["usable_cpus"] or 1):
        print(f"note: the machine was already loaded at the start (load average {info['loadavg'][0]:.2f} on "
              f"{info['usable_cpus']} CPUs): figures are noisy")
    if threads + 1 > (info["usable_cpus"] or 1):
        print(f"note: server ({threads} torch threads + event loop) and client share {info['usable_cpus']} CPUs: "
              "the client's CPU use is taken from the server")

    result = {"machine": info, "bundle": str(Path(args.bundle).resolve()), "digest": inspector.bundle.digest,
              "settings": {"requests": args.requests, "seconds": args.seconds, "batch_size": args.batch_size,
                           "client_procs": args.client_procs,
                           "threads": threads, "images": args.images},
              "ceiling": {"images_per_s": ceiling, "before": ceiling_before, "after": ceiling_after},
              "rows": rows}
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
