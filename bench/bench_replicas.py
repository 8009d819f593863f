"""One replica against two behind HAProxy, and how fast a stopped replica leaves the pool.

Plays deploy/deployment.yaml with ``podman kube play`` as two pods and puts
Debian's HAProxy in front (scripts/kube_replicas.py, the code the failover
test uses), then, in one run on one machine:

1. Throughput and latency with one and with two replicas: ``wrk`` sends
   single-image ``POST /detect`` requests (real Fashion-MNIST test images as
   PNG, application/octet-stream, with the API key) through HAProxy; "one
   replica" is the same pair with the second pod put in maintenance on
   HAProxy's admin socket, so both settings run on the same pods.  Settings
   alternate (1, 2, 2, 1, ...) so that drift from other load on the machine
   falls on both; HAProxy's per-server counters show who answered.
2. SIGTERM to a replica while wrk keeps two replicas busy, two ways:
   * ``sigterm``: the signal alone, the replica still in the pool; the server
     closes its listener at once and HAProxy's active check of /ready
     (every 1 s, 250 ms once failing, 2 failures) takes it out of the pool;
     connections refused meanwhile are retried on the other replica;
   * ``k8s``: what deploy/deployment.yaml does on Kubernetes: the replica
     leaves the pool first (here ``set server ... state maint``, there the
     endpoint removal), the preStop sleep runs, then SIGTERM.
   The replica is stopped as the kubelet stops a container (``podman
   stop``: SIGTERM, SIGKILL after the grace period).  For each stop: time
   from the SIGTERM (just before the ``podman stop`` call, so podman's own
   start-up is included) to the replica leaving HAProxy's pool, to the
   server logging "Shutting down", the server's own drain time (its log
   lines "Shutting down" to "stopped after SIGTERM", host-clock stamps),
   when ``podman stop`` returned, the exit code, the requests HAProxy had to
   redispatch, and wrk's errors and p99 over the run around the stop.  Then
   the container is started again (after the load) and the time until it is
   ready and back in the pool is printed: a new replica's start-up.

Every body is sent once through HAProxy first and its answer checked against
the offline score (``Inspector`` on the shipped bundle).

Usage (root, podman, haproxy and wrk installed; builds the image when absent):

    .venv/bin/python bench/bench_replicas.py [--image localhost/pathguard:latest] [--duration 10]
        [--connections 16] [--rounds 2] [--stops 2] [--out reports/bench/replicas.txt]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import kube_replicas
from pathguard.detector.bundle import DEFAULT_BUNDLE
from pathguard.detector.data import load_dataset
from pathguard.detector.inspection import Inspector

# One pre-built request per body file, cycled; -H headers kept; a WRK_JSON summary line.
WRK_BODIES = Path(__file__).resolve().parent / "wrk_bodies.lua"


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8"), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def prepare_bodies(workdir: Path, n: int) -> tuple[list[Path], list[bytes], list]:
    test = load_dataset("fashion-mnist", "test").head(n)
    offline = Inspector.load(DEFAULT_BUNDLE).inspect(test.images)
    bodies = [png(image) for image in test.images]
    paths = []
    for i, body in enumerate(bodies):
        paths.append(workdir / f"body-{i}.png")
        paths[-1].write_bytes(body)
    return paths, bodies, offline


def check_answers(url: str, key: str, bodies: list[bytes], offline: list) -> None:
    with httpx.Client(headers={"X-API-Key": key, "Content-Type": "application/octet-stream"}, timeout=30) as c:
        for body, want in zip(bodies, offline):
            got = c.post(f"{url}/detect", content=body).raise_for_status().json()["results"][0]
            if got["predicted_class"] != want.predicted_class or abs(got["score"] - want.score) > 1e-4 * max(
                    1.0, abs(want.score)):
                raise SystemExit(f"answer differs from the offline one: {got} vs {want}")


def wrk(url: str, key: str, lua: Path, bodies: list[Path], duration: float, connections: int) -> dict:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "30s",
           "-H", f"X-API-Key: {key}", "-s", str(lua), url, "--", "POST", "/detect", "application/octet-stream", *map(str, bodies)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 120).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRK_JSON "))
    result = json.loads(line.removeprefix("WRK_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(v for k, v in result.items() if k.startswith("errors_"))
    return result


def served(balancer) -> dict[str, int]:
    return {name: int(row["hrsp_2xx"]) for name, row in balancer.servers().items()}


def batch_counts(pods) -> dict[str, tuple[float, float]]:
    """Per pod: (images, inference calls) so far, from its /metrics (pathguard_batch_size)."""
    counts = {}
    for pod in pods:
        text = httpx.get(f"{pod.url}/metrics", timeout=10).text
        total = re.search(r"^pathguard_batch_size_sum (\S+)", text, re.MULTILINE)
        calls = re.search(r"^pathguard_batch_size_count (\S+)", text, re.MULTILINE)
        counts[pod.name] = (float(total[1]) if total else 0.0, float(calls[1]) if calls else 0.0)
    return counts


def redispatched(balancer) -> int:
    return sum(int(row["wredis"] or 0) + int(row["wretr"] or 0) for row in balancer.servers().values())


def wait_status(balancer, server: str, prefix: str, timeout_s: float = 120, poll_s: float = 0.02) -> float:
    deadline = time.monotonic() + timeout_s
    while not balancer.servers()[server]["status"].startswith(prefix):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server} not {prefix} after {timeout_s} s")
        time.sleep(poll_s)
    return time.monotonic()


def throughput(args, replicas, balancer, lua, paths) -> list[dict]:
    second = replicas.pods[1].name
    runs = []
    order = [n for r in range(args.rounds) for n in ((1, 2) if r % 2 == 0 else (2, 1))]
    for n in order:
        balancer.set_state(second, "maint" if n == 1 else "ready")
        wait_status(balancer, second, "MAINT" if n == 1 else "UP")
        before, batches = served(balancer), batch_counts(replicas.pods)
        result = wrk(balancer.url, replicas.api_key, lua, paths, args.duration, args.connections)
        after, batches_after = served(balancer), batch_counts(replicas.pods)
        images = {k: (batches_after[k][0] - batches[k][0], batches_after[k][1] - batches[k][1]) for k in batches}
        result.update(replicas_in_pool=n, per_server={k: after[k] - before[k] for k in after},
                      images_per_call={k: round(i / c, 1) for k, (i, c) in images.items() if c},
                      loadavg=os.getloadavg()[0])
        runs.append(result)
        print(f"  {n} replica(s): {result['rps']:.1f} req/s, p50 {result['p50_us'] / 1000:.1f} ms, "
              f"p99 {result['p99_us'] / 1000:.1f} ms, errors {result['errors']}, per server {result['per_server']}, "
              f"images per inference call {result['images_per_call']}",
              flush=True)
    balancer.set_state(second, "ready")
    wait_status(balancer, second, "UP")
    return runs


def log_times(replicas, pod, since: float) -> dict[str, float]:
    """Host-clock times (time.time()) of the server's own shutdown lines logged after ``since``."""
    times = {}
    for line in replicas.logs(pod, timestamps=True).splitlines():
        stamp, _, text = line.partition(" ")
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp)
        if not m:
            continue
        t = datetime.fromisoformat(m[1] + (m[2] or "")[:7] + m[3].replace("Z", "+00:00")).timestamp()
        for key, marker in (("shutting_down", "Shutting down"), ("stopped", "stopped after SIGTERM")):
            if t >= since and marker in text and key not in times:
                times[key] = t
    return times


def one_stop(mode: str, replicas, balancer, pod, pre_stop_s: float) -> dict:
    """Stop ``pod``'s container as the kubelet does (``podman stop``: SIGTERM, SIGKILL after the
    grace period; ``podman kill`` would not do: podman then restarts the container, as the
    Deployment's restartPolicy says), after taking it out of the pool and a preStop wait in mode
    k8s."""
    result = {"mode": mode}
    retried = redispatched(balancer)
    if mode == "k8s":
        balancer.set_state(pod.name, "maint")
        time.sleep(pre_stop_s)
    wall, t_call = time.time(), time.monotonic()
    stopper = threading.Thread(target=replicas_stop, args=(pod,))
    stopper.start()
    if mode == "sigterm":
        result["sigterm_to_out_of_pool_s"] = wait_status(balancer, pod.name, "DOWN") - t_call
    stopper.join()
    result["podman_stop_returned_s"] = time.monotonic() - t_call
    logged = log_times(replicas, pod, wall - 1)
    result.update(sigterm_to_shutting_down_s=logged["shutting_down"] - wall,
                  drain_s=logged["stopped"] - logged["shutting_down"],
                  exit_code=replicas.exit_code(pod), redispatched=redispatched(balancer) - retried)
    return result


def restart(mode: str, replicas, balancer, pod) -> dict:
    """Start the stopped container again (kube play pods stop with their last container, so the
    infra restarts too and the pod gets a new IP: HAProxy is told). Mode sigterm: HAProxy's checks
    bring it back; mode k8s: it goes back in the pool when its own /ready answers, as an endpoint."""
    t_start = time.monotonic()
    kube_replicas.podman("start", pod.container)
    pod_now = replicas.pod(pod.name)
    balancer.set_address(pod.name, pod_now.ip)
    replicas.wait_ready([pod_now], 240)
    ready = time.monotonic() - t_start
    if mode == "k8s":
        balancer.set_state(pod.name, "ready")
    return {"start_to_ready_s": ready,
            "start_to_back_in_pool_s": wait_status(balancer, pod.name, "UP", poll_s=0.1) - t_start}


def replicas_stop(pod) -> None:
    kube_replicas.podman("stop", "-t", str(kube_replicas.DEFAULT_GRACE_S), pod.container,
                         timeout=kube_replicas.DEFAULT_GRACE_S + 60)


def run_wrk_into(result: dict, *args) -> None:
    result.update(wrk(*args))


def stops(args, replicas, balancer, lua, paths) -> list[dict]:
    """Each stop under a wrk run that starts 3 s before and ends 5 s after the container exited
    (at the latest); the restart comes after the load."""
    results = []
    pod = replicas.pods[1]
    for k in range(args.stops):
        for mode in ("sigterm", "k8s"):
            load: dict = {}
            duration = 3 + (args.pre_stop if mode == "k8s" else 0) + 12
            thread = threading.Thread(target=run_wrk_into, args=(load, balancer.url, replicas.api_key, lua, paths,
                                                                 duration, args.connections))
            thread.start()
            time.sleep(3)
            result = one_stop(mode, replicas, balancer, pod, args.pre_stop)
            thread.join()
            result.update(wrk_requests=load["requests"], wrk_errors=load["errors"],
                          wrk_p99_ms=load["p99_us"] / 1000)
            result.update(restart(mode, replicas, balancer, pod))
            results.append(result)
            print(f"  stop {k + 1} ({mode}): " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float)
                                                         else f"{key} {value}" for key, value in result.items()
                                                         if key != "mode"), flush=True)
    return results


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    version = lambda cmd: subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {"cpu": cpu, "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "podman": version(["podman", "--version"]), "haproxy": version(["haproxy", "-v"]),
            "wrk": version(["wrk", "-v"]) or "wrk", "kernel": platform.release()}


def summary(args, info: dict, runs: list[dict], stop_results: list[dict]) -> str:
    by = {n: [r for r in runs if r["replicas_in_pool"] == n] for n in (1, 2)}
    med = {n: {k: statistics.median(r[k] for r in by[n]) for k in ("rps", "p50_us", "p99_us")} for n in by}
    lines = [
        "PathGuard replicas behind HAProxy (bench/bench_replicas.py)",
        (f"command: .venv/bin/python bench/bench_replicas.py --image {args.image} --duration {args.duration:g} --connections "
        f"{args.connections} --rounds {args.rounds} --stops {args.stops}"),
        (f"machine: {info['cpu']}, {info['cpus']} CPUs, load average at start {info['loadavg_at_start'][0]:.1f} "
        f"(shared with other jobs); {info['podman']}; {info['haproxy'].split(' - ')[0]}; kernel {info['kernel']}"),
        f"deployment: deploy/deployment.yaml via podman kube play, image {args.image}, torch threads 1 per replica,",
        (f"  CPU limit 2 per replica; wrk -t2 -c{args.connections} -d{args.duration:g}s, single-image POST /detect "
        "(PNG, octet-stream, API key), through HAProxy"),
        "",
        "throughput, each run (settings alternated):",
        ("| replicas in pool | req/s | p50 ms | p99 ms | errors | answered per server | images per inference call "
        "| load avg |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['replicas_in_pool']} | {r['rps']:.1f} | {r['p50_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} "
                     f"| {r['errors']} | {r['per_server']} | {r['images_per_call']} | {r['loadavg']:.1f} |")
    gain = med[2]["rps"] / med[1]["rps"]
    lines += ["", "median of the runs:",
              "| replicas | req/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for n in (1, 2):
        lines.append(f"| {n} | {med[n]['rps']:.1f} | {med[n]['p50_us'] / 1000:.1f} | {med[n]['p99_us'] / 1000:.1f} |")
    lines += [f"two replicas / one: {gain:.2f}x the requests/s, p99 {med[2]['p99_us'] / med[1]['p99_us']:.2f}x",
              "", "SIGTERM under load (wrk on two replicas; times from just before the podman stop call):",
              ("| mode | SIGTERM -> out of pool s | SIGTERM -> server logs 'Shutting down' s | server's drain s "
              "| podman stop returned s | exit code | redispatched | wrk errors | wrk requests "
              "| wrk p99 ms | restart -> ready s | restart -> back in pool s |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in stop_results:
        out = f"{s['sigterm_to_out_of_pool_s']:.2f}" if "sigterm_to_out_of_pool_s" in s else \
            f"before it (preStop {args.pre_stop:g} s)"
        lines.append(f"| {s['mode']} | {out} | {s['sigterm_to_shutting_down_s']:.2f} | {s['drain_s']:.2f} "
                     f"| {s['podman_stop_returned_s']:.2f} | {s['exit_code']} | {s['redispatched']} "
                     f"| {s['wrk_errors']} | {s['wrk_requests']} | {s['wrk_p99_ms']:.0f} | {s['start_to_ready_s']:.1f} "
                     f"| {s['start_to_back_in_pool_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="localhost/pathguard:latest")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (1 replica, 2 replicas) runs")
    parser.add_argument("--stops", type=int, default=2, help="SIGTERM measurements per mode")
    parser.add_argument("--pre-stop", type=float, default=5.0, help="the preStop sleep of mode k8s")
    parser.add_argument("--bodies", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench" / "replicas.txt")
    args = parser.parse_args(argv)
    for tool in ("podman", "haproxy", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install -y {tool})")
    env = kube_replicas.podman_env()
    if subprocess.run(["podman", "image", "exists", args.image], env=env, check=False).returncode != 0:
        subprocess.run(["bash", "docker/build.sh", args.image], cwd=REPO_ROOT, env=env, check=True)
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="pathguard-bench-replicas-"))
    replicas = kube_replicas.Replicas(f"pgbench{uuid.uuid4().hex[:6]}", args.image, replicas=2,
                                      workdir=workdir / "kube")
    balancer = None
    try:
        lua = WRK_BODIES
        paths, bodies, offline = prepare_bodies(workdir, args.bodies)
        print("playing two replicas ...", flush=True)
        pods = replicas.up()
        balancer = kube_replicas.HAProxy(pods, workdir)
        balancer.start()
        check_answers(balancer.url, replicas.api_key, bodies, offline)
        print(f"{len(bodies)} answers checked against the offline scores; throughput:", flush=True)
        runs = throughput(args, replicas, balancer, lua, paths)
        print("SIGTERM under load:", flush=True)
        stop_results = stops(args, replicas, balancer, lua, paths)
    finally:
        if balancer is not None:
            balancer.stop()
        replicas.down()
        shutil.rmtree(workdir, ignore_errors=True)
    text = summary(args, info, runs, stop_results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "throughput": runs,
         "stops": stop_results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
