"""Run deploy/deployment.yaml on this machine: ``podman kube play`` replicas behind HAProxy.

    .venv/bin/python scripts/kube_replicas.py up [--replicas 2] [--image localhost/pathguard:latest]
                                                 [--port 8080] [--name pathguard-local] [--key KEY]
        plays the Deployment (N pods, one per replica), starts Debian's HAProxy on 127.0.0.1:PORT
        with active health checks on /ready, prints the URL and the API key, and serves until
        Ctrl-C or SIGTERM; then it removes everything it made (pods, secret, volume, HAProxy).
    .venv/bin/python scripts/kube_replicas.py down --name NAME
        removes what a killed run left behind (pods NAME-*, secret NAME-api-key, volume NAME-tmp).

Build the image first (``bash docker/build.sh``); podman needs root here and
CONTAINERS_CONF=docker/containers.conf (set by this script unless already set).
tests/test_deploy_kube.py and bench/bench_replicas.py use the same code (``Replicas``, ``HAProxy``).

What is changed in the Deployment for podman, and nothing else (``render_for_podman``):

* metadata.name, so that runs do not collide (podman names the pods NAME-pod-0 .. NAME-pod-N-1),
  spec.replicas, the container image;
* the Secret's name (the key's value is a podman secret made here, in the JSON map format
  podman 4 reads: {"api-key": base64});
* the emptyDir's name: podman 4 makes an emptyDir a named volume, global to the machine;
* the containers' ``ports`` are dropped: podman 4 publishes every containerPort on the host at
  the same number, so two replicas would collide on 8000 (and the service would be open on every
  interface). HAProxy reaches each pod on its own IP, as a Kubernetes Service reaches its endpoints.

What podman 4.3 ignores, and what stands in for it here: readinessProbe (HAProxy's check of /ready
takes the pod out of the pool), lifecycle.preStop and terminationGracePeriodSeconds (``stop``
passes the grace period to ``podman stop -t``), liveness (podman turns it into a healthcheck
that needs systemd timers; without systemd it logs an error and does not run).
Podmans that play a Deployment as one pod whatever its replicas are handled too: the spec is
then played once more per missing replica, under NAME-1, NAME-2, ...
"""

from __future__ import annotations

import argparse
import base64
import copy
import csv
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "deploy" / "deployment.yaml"
CONTAINERS_CONF = ROOT / "docker" / "containers.conf"
SERVICE_PORT = 8000          # the port the image's server listens on (PATHGUARD_PORT in docker/Dockerfile)
DEFAULT_GRACE_S = 40         # deploy/deployment.yaml's terminationGracePeriodSeconds


def podman_env() -> dict:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], check=False, env=podman_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the Deployment, for podman


def load_deployment(path: Path = DEPLOYMENT) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise ValueError(f"{path}: expected one Deployment, found {len(deployments)}")
    return deployments[0]


def render_for_podman(deployment: dict, name: str, image: str, replicas: int, prefix: str | None = None) -> dict:
    """The Deployment as podman plays it here (see the module's docstring for every change);
    the secret and the volume are named PREFIX-... (default: NAME-...)."""
    prefix = prefix or name
    d = copy.deepcopy(deployment)
    d["metadata"]["name"] = name
    d["spec"]["replicas"] = replicas
    pod = d["spec"]["template"]["spec"]
    renamed = {}
    for volume in pod.get("volumes", []):
        if "emptyDir" in volume:
            renamed[volume["name"]] = volume["name"] = f"{prefix}-{volume['name']}"
    for container in pod["containers"]:
        container["image"] = image
        container.pop("ports", None)
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                ref["name"] = f"{prefix}-{ref['name']}"
    return d


def secret_refs(deployment: dict) -> list[tuple[str, str]]:
    """(secret name, key) of every secretKeyRef of the Deployment's containers."""
    refs = []
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"]))
    return refs


# ------------------------------------------------------------------ the replicas


@dataclass
class Pod:
    name: str
    container: str
    ip: str

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{SERVICE_PORT}"


class Replicas:
    """``podman kube play`` of deploy/deployment.yaml as ``replicas`` pods; ``down()`` removes
    everything made (also what a failed ``up()`` made)."""

    def __init__(self, name: str, image: str, replicas: int = 2, api_key: str | None = None,
                 workdir: Path | None = None, source: Path = DEPLOYMENT) -> None:
        self.name, self.image, self.replicas = name, image, replicas
        self.api_key = api_key or secrets.token_hex(24)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.played: list[Path] = []
        self.secrets: list[str] = []
        self.pods: list[Pod] = []
        self.exited_at: dict[str, float] = {}

    def up(self, ready_timeout_s: float = 240) -> list[Pod]:
        deployment = load_deployment(self.source)
        for secret, key in secret_refs(render_for_podman(deployment, self.name, self.image, 1)):
            self._secret(secret, {key: self.api_key})
        self._play(render_for_podman(deployment, self.name, self.image, self.replicas))
        k = 1
        while len(self._pod_names()) < self.replicas:   # a podman that plays one pod per Deployment
            self._play(render_for_podman(deployment, f"{self.name}-{k}", self.image, 1, prefix=self.name))
            k += 1
        self.pods = [self._pod(pod) for pod in self._pod_names()]
        self.wait_ready(self.pods, ready_timeout_s)
        return self.pods

    def _secret(self, secret: str, data: dict[str, str]) -> None:
        path = self.workdir / f"{secret}.json"
        path.write_text(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()}))
        path.chmod(0o600)
        podman("secret", "rm", secret, check=False)
        podman("secret", "create", secret, str(path))
        path.unlink()
        self.secrets.append(secret)

    def _play(self, deployment: dict) -> None:
        path = self.workdir / f"{deployment['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(deployment, sort_keys=False))
        self.played.append(path)
        podman("kube", "play", str(path))

    def _pod_names(self) -> list[str]:
        out = podman("pod", "ps", "--filter", f"name=^{self.name}-", "--format", "{{.Name}}").stdout
        return sorted(line for line in out.split() if line)

    def pod(self, pod: str) -> Pod:
        """A pod's container and its IP now."""
        return self._pod(pod)

    def _pod(self, pod: str) -> Pod:
        info = json.loads(podman("pod", "inspect", pod).stdout)
        info = info[0] if isinstance(info, list) else info
        containers = [c["Name"] for c in info["Containers"] if c["Id"] != info.get("InfraContainerID")]
        networks = json.loads(podman("inspect", info["InfraContainerID"]).stdout)[0]["NetworkSettings"]["Networks"]
        ips = [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]
        if not ips:
            raise RuntimeError(f"pod {pod} has no IP address on a podman network")
        return Pod(pod, containers[0], ips[0])

    def wait_ready(self, pods: list[Pod], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(pods)
        while waiting:
            pod = waiting[0]
            try:
                if httpx.get(f"{pod.url}/ready", timeout=2).status_code == 200:
                    waiting.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pod.name} not ready after {timeout_s:.0f} s; its log ends:\n"
                                   f"{self.logs(pod)[-3000:]}")
            time.sleep(0.5)

    def logs(self, pod: Pod, timestamps: bool = False) -> str:
        """The container's stdout (uvicorn's access lines) and stderr (everything else) merged in
        time order; podman hands them back as two streams."""
        result = podman("logs", "-t", pod.container, check=False)
        lines = sorted(result.stdout.splitlines() + result.stderr.splitlines(), key=_log_time)
        if not timestamps:
            lines = [line.split(" ", 1)[1] if " " in line else line for line in lines]
        return "".join(f"{line}\n" for line in lines)

    def stop(self, pod: Pod, grace_s: int = DEFAULT_GRACE_S) -> None:
        """What the kubelet does: SIGTERM to the container, SIGKILL after the grace period, and
        only then the pod's network goes (blocks until stopped; ``exited_at[pod.name]`` is the
        time.monotonic() when the container had exited). Not ``podman pod stop`` alone:
        it stops the infra container at the same time, which takes the pod's IP away while the
        server is still draining, and the answers in flight are lost."""
        podman("stop", "-t", str(grace_s), pod.container, timeout=grace_s + 60)
        self.exited_at[pod.name] = time.monotonic()
        podman("pod", "stop", "-t", "5", pod.name, timeout=60)

    def exit_code(self, pod: Pod) -> int:
        return json.loads(podman("inspect", pod.container).stdout)[0]["State"]["ExitCode"]

    def down(self) -> None:
        for path in reversed(self.played):
            podman("kube", "down", str(path), check=False, timeout=120)
        cleanup(self.name)
        for secret in self.secrets:
            podman("secret", "rm", secret, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _log_time(line: str) -> tuple[str, str]:
    """Sort key of a ``podman logs -t`` line: its RFC 3339 stamp, the fraction padded (podman
    drops trailing zeros, so the stamps are not all the same width)."""
    stamp = line.split(" ", 1)[0]
    seconds, _, rest = stamp.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())
    return seconds, fraction.ljust(9, "0")


def cleanup(name: str) -> None:
    """Remove pods NAME-*, the secret NAME-api-key and volumes NAME-*, whatever made them."""
    out = podman("pod", "ps", "-a", "--filter", f"name=^{name}-", "--format", "{{.Name}}", check=False).stdout
    for pod in out.split():
        podman("pod", "rm", "-f", "-t", "5", pod, check=False, timeout=120)
    podman("secret", "rm", f"{name}-api-key", check=False)
    out = podman("volume", "ls", "--filter", f"name=^{name}-", "--format", "{{.Name}}", check=False).stdout
    for volume in out.split():
        podman("volume", "rm", "-f", volume, check=False)


# ------------------------------------------------------------------ the balancer

HAPROXY_CFG = """\
# HAProxy in front of the PathGuard pods (scripts/kube_replicas.py writes this file).
global
    maxconn 4096
    stats socket {socket} mode 600 level admin
    log stderr format short local0 info

defaults
    mode http
    log global
    # One line per request that met an error, a timeout, a retry or a redispatch (with its
    # termination state: who closed what, when); successful requests are not logged.
    option httplog
    option dontlog-normal
    timeout connect 1s
    timeout client 30s
    timeout server 30s            # > PATHGUARD_INFERENCE_TIMEOUT_S (10 s)
    timeout http-request 10s
    timeout queue 10s
    # A request that meets a refused connection, a closed connection or a 503 (a replica
    # that is draining or full) is sent again, to another replica: POST /detect has no side
    # effect, so a retry is safe. Only requests that fit one buffer (16 kB) are retried.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response 503
    option http-buffer-request

frontend pathguard
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance {balance}
    option httpchk GET /ready
    http-check expect status 200
    default-server check inter {inter_ms}ms fastinter {fastinter_ms}ms downinter 1s fall {fall} rise {rise}
{servers}
"""


class HAProxy:
    """Debian's haproxy as a child process, one server per pod, admin socket for stats."""

    def __init__(self, pods: list[Pod], workdir: Path, port: int | None = None, balance: str = "roundrobin",
                 inter_ms: int = 1000, fastinter_ms: int = 250, fall: int = 2, rise: int = 2) -> None:
        self.pods, self.workdir = pods, Path(workdir)
        self.port = port or free_port()
        self.socket = self.workdir / "haproxy.sock"
        self.config = self.workdir / "haproxy.cfg"
        servers = "\n".join(f"    server {p.name} {p.ip}:{SERVICE_PORT}" for p in pods)
        self.config.write_text(HAPROXY_CFG.format(
            socket=self.socket, port=self.port, balance=balance, inter_ms=inter_ms, fastinter_ms=fastinter_ms,
            fall=fall, rise=rise, servers=servers))
        self.log = self.workdir / "haproxy.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (apt-get install -y haproxy; scripts/test.sh does)")
        subprocess.run([binary, "-c", "-q", "-f", str(self.config)], check=True, capture_output=True, text=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while not all(s["status"] == "UP" for s in self.servers().values()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not bring every server UP: {self.servers()}\n{self.log.read_text()}")
            time.sleep(0.2)

    def log_summary(self) -> str:
        """HAProxy's log without the requests that were resent and then answered normally
        (termination state ``----``: a refused connection redispatched to the other replica, or
        an L7 retry), which are counted instead; what is left are server events and requests
        that went wrong."""
        shown, answered = [], 0
        for line in self.log.read_text(errors="replace").splitlines():
            if " ---- " in line and '"' in line:
                answered += 1
            else:
                shown.append(line)
        return "\n".join(shown + [f"({answered} requests resent and answered, not shown)"])

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> list[dict]:
        for _ in range(50):   # the socket may not exist yet just after start
            try:
                text = self.command("show stat")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.1)
        else:
            raise RuntimeError(f"haproxy's stats socket {self.socket} does not answer")
        return list(csv.DictReader(io.StringIO(text.lstrip("# "))))

    def servers(self) -> dict[str, dict]:
        return {row["svname"]: row for row in self.stats()
                if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def frontend(self) -> dict:
        return next(row for row in self.stats() if row["pxname"] == "pathguard" and row["svname"] == "FRONTEND")

    def set_state(self, server: str, state: str) -> None:
        """ready / drain / maint: take a server out of the pool (or back) by hand."""
        answer = self.command(f"set server replicas/{server} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy: {answer}")

    def set_address(self, server: str, ip: str) -> None:
        """Point a server at a pod's new IP (a pod whose infra container restarted gets a new one)."""
        answer = self.command(f"set server replicas/{server} addr {ip} port {SERVICE_PORT}").strip()
        if "changed" not in answer and "no need to change" not in answer:
            raise RuntimeError(f"haproxy: {answer}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# ------------------------------------------------------------------ command line


def _up(args: argparse.Namespace) -> int:
    replicas = Replicas(args.name, args.image, args.replicas, api_key=args.key)
    balancer = None
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    try:
        print(f"playing {DEPLOYMENT.relative_to(ROOT)} as {args.replicas} pods of {args.image} ...", flush=True)
        pods = replicas.up()
        balancer = HAProxy(pods, replicas.workdir, port=args.port)
        balancer.start()
        for pod in pods:
            print(f"  {pod.name}  {pod.url}  ready")
        print(f"HAProxy: {balancer.url}  (health checks: GET /ready; admin socket {balancer.socket})")
        print(f"API key: {replicas.api_key}")
        print(f"try:  curl -H 'X-API-Key: {replicas.api_key}' --data-binary @image.png "
              f"-H 'Content-Type: application/octet-stream' {balancer.url}/detect")
        print("Ctrl-C stops and removes everything.", flush=True)
        while stop["signal"] is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("tearing down ...", flush=True)
        if balancer is not None:
            balancer.stop()
        replicas.down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="play the Deployment behind HAProxy until Ctrl-C")
    up.add_argument("--name", default="pathguard-local", help="prefix of the pods, secret and volume")
    up.add_argument("--image", default="localhost/pathguard:latest")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--port", type=int, default=8080, help="HAProxy's port on 127.0.0.1")
    up.add_argument("--key", default=None, help="the API key (default: a random one, printed)")
    down = sub.add_parser("down", help="remove what a killed run left behind")
    down.add_argument("--name", default="pathguard-local")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None:
        print("podman is not installed (apt-get install -y podman runc)", file=sys.stderr)
        return 2
    if args.command == "down":
        cleanup(args.name)
        return 0
    return _up(args)


if __name__ == "__main__":
    sys.exit(main())
