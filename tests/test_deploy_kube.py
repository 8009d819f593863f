"""The Kubernetes manifests in deploy/, checked, and run for real on this machine.

``podman kube play`` runs deploy/deployment.yaml as two replicas (pods) of the
image docker/build.sh makes (localhost/pathguard:citest, built once per test
session by the ``citest_image`` fixture of tests/conftest.py), Debian's
HAProxy balances them with active checks on /ready (scripts/kube_replicas.py),
and a bounded load of real Fashion-MNIST images goes through HAProxy with the
API key from the (podman) Secret.  Mid-load one replica is stopped as the
kubelet stops a pod (SIGTERM, then SIGKILL after the grace period): not one
request may fail, every answer must equal the offline score of the shipped
bundle (``Inspector``), both replicas must have answered, the stopped one
must have drained and exited 0 and left HAProxy's pool.

About a minute on 2 cores, plus the image build if no earlier test built it.
scripts/test.sh installs podman, runc, debootstrap and haproxy, so nothing
here skips: a missing tool fails with the package to install.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from pathguard.detector.artifacts import manifest_digest
from pathguard.detector.bundle import DEFAULT_BUNDLE
from pathguard.detector.data import load_dataset
from pathguard.detector.inspection import Inspector
from pathguard.service.settings import Settings
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import kube_replicas

DEPLOY = ROOT / "deploy"
WORKERS = 6                 # concurrent clients
BEFORE_STOP = 150           # requests answered before one replica is stopped
AFTER_STOP = 150            # requests answered after it has stopped
LOAD_DEADLINE_S = 150


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def _container(docs: dict) -> dict:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


# ------------------------------------------------------------------ the manifests


def test_every_manifest_is_applied_and_every_env_var_is_a_setting():
    docs = _docs()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Kustomization"} <= set(docs)
    kustomization = docs["Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in DEPLOY.glob("*.yaml")
                                                         if p.name != "kustomization.yaml")
    container = _container(docs)
    image_name = container["image"].rsplit(":", 1)[0]
    assert [i["name"] for i in kustomization["images"]] == [image_name]
    settings = {f"PATHGUARD_{name.upper()}" for name in Settings.model_fields}
    unknown = {name for name in _env(container) if name.startswith("PATHGUARD_")} - settings
    assert not unknown, f"not PathGuard settings (service/settings.py): {unknown}"
    for name, entry in _env(container).items():   # and each value is a valid value of its setting
        if "value" in entry and name.startswith("PATHGUARD_"):
            Settings(**{name.removeprefix("PATHGUARD_").lower(): entry["value"]})


def test_deployment_pins_the_shipped_bundle_and_takes_the_key_from_a_secret():
    docs = _docs()
    deployment, container = docs["Deployment"], _container(docs)
    env = _env(container)
    digest = manifest_digest(DEFAULT_BUNDLE)
    assert env["PATHGUARD_EXPECTED_DIGEST"]["value"] == digest
    assert deployment["metadata"]["annotations"]["pathguard.io/bundle-digest"] == digest
    assert "value" not in env["PATHGUARD_API_KEY"]
    assert env["PATHGUARD_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pathguard-api-key", "key": "api-key"}
    Settings(expected_digest=env["PATHGUARD_EXPECTED_DIGEST"]["value"])  # a valid value of the setting


def test_deployment_probes_security_and_resources():
    docs = _docs()
    deployment, container = docs["Deployment"], _container(docs)
    pod = deployment["spec"]["template"]["spec"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    port = int(re.search(r"PATHGUARD_PORT=(\d+)", dockerfile).group(1))
    uid = int(re.search(r"--uid (\d+)", dockerfile).group(1))
    assert deployment["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port}
    assert container["startupProbe"]["httpGet"]["port"] == port
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts and all("emptyDir" in volumes[name] for name in mounts.values())
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    threads = int(_env(container)["PATHGUARD_TORCH_THREADS"]["value"])
    workers = int(_env(container)["PATHGUARD_INFERENCE_WORKERS"]["value"])
    assert workers * threads <= float(container["resources"]["limits"]["cpu"])  # no more threads than CPUs


def test_termination_grace_covers_the_servers_drain():
    """service/server.py: uvicorn waits up to inference_timeout_s + 5 s for the requests in flight,
    then the batcher up to inference_timeout_s + 5 s for the queue; the preStop sleep comes first."""
    docs = _docs()
    container = _container(docs)
    timeout_s = float(_env(container)["PATHGUARD_INFERENCE_TIMEOUT_S"]["value"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 1 <= pre_stop <= 15
    assert grace >= pre_stop + 2 * (timeout_s + 5)


def test_service_hpa_and_pdb_select_the_deployments_pods():
    docs = _docs()
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selects = lambda selector: all(labels.get(k) == v for k, v in selector.items())
    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(docs["Service"]["spec"]["selector"])
    assert selects(docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == _container(docs)["ports"][0]["name"]
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb.get("maxUnavailable", 0) == 1 or pdb.get("minAvailable", 0) >= 1


# ------------------------------------------------------------------ run for real


@pytest.fixture(scope="module")
def image(citest_image):
    """The image docker/build.sh makes (built once per session, tests/conftest.py)."""
    assert shutil.which("haproxy"), "haproxy is not installed: scripts/test.sh installs it (apt-get install haproxy)"
    return citest_image[0]


@pytest.fixture(scope="module")
def cases():
    """48 real test images as PNG, with the shipped bundle's offline answer for each (none within
    1e-3 of the threshold, so a flag cannot flip on float noise)."""
    test = load_dataset("fashion-mnist", "test").head(64)
    offline = Inspector.load(DEFAULT_BUNDLE).inspect(test.images)
    chosen = [i for i, r in enumerate(offline) if abs(r.score - r.threshold) > 1e-3][:48]
    assert len(chosen) == 48
    return [(_png(test.images[i]), offline[i]) for i in chosen]


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8"), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def deployment(image, request):
    name = f"pgkt{uuid.uuid4().hex[:6]}"
    replicas = kube_replicas.Replicas(name, image, replicas=2)
    request.addfinalizer(replicas.down)          # registered first: runs last, also after a failed up()
    pods = replicas.up()
    balancer = kube_replicas.HAProxy(pods, replicas.workdir)
    request.addfinalizer(balancer.stop)
    balancer.start()
    return replicas, balancer


@dataclass
class Load:
    """Closed-loop clients through the balancer; every answer checked against the offline one."""
    url: str
    key: str
    cases: list
    done: int = 0
    failures: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)
    finished_at: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def worker(self, k: int) -> None:
        with httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=30) as client:
            n = k
            while not self.stop.is_set():
                n += WORKERS
                picked = [self.cases[(n + j) % len(self.cases)] for j in range(3 if n % 5 == 0 else 1)]
                try:  # anything that goes wrong is a failed request, never a dead client thread
                    if len(picked) == 1:
                        response = client.post("/detect", content=picked[0][0],
                                               headers={"Content-Type": "application/octet-stream"})
                    else:
                        response = client.post("/detect", files=[("files", (f"{j}.png", png, "image/png"))
                                                                  for j, (png, _) in enumerate(picked)])
                    if response.status_code != 200:
                        self._record(failure=f"{response.status_code}: {response.text[:200]}")
                        continue
                    self._record(mismatch=_compare(response.json()["results"], [offline for _, offline in picked]))
                except Exception as exc:  # noqa: BLE001
                    self._record(failure=f"{type(exc).__name__}: {exc}")

    def _record(self, failure: str | None = None, mismatch: str | None = None) -> None:
        with self.lock:
            self.done += 1
            self.finished_at.append(time.monotonic())
            if failure:
                self.failures.append(failure)
            if mismatch:
                self.mismatches.append(mismatch)


def _compare(results: list[dict], expected: list) -> str | None:
    if len(results) != len(expected):
        return f"{len(results)} results for {len(expected)} images"
    for got, want in zip(results, expected):
        if (got["predicted_class"], got["adversarial"]) != (want.predicted_class, want.adversarial) or \
                abs(got["score"] - want.score) > 1e-4 * max(1.0, abs(want.score)):
            return f"got {got['predicted_class']}/{got['adversarial']}/{got['score']}, offline " \
                   f"{want.predicted_class}/{want.adversarial}/{want.score}"
    return None


def _detect_200(url: str) -> int:
    """Requests POST /detect answered 200, from one replica's own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r'pathguard_requests_total\{endpoint="/detect",method="POST",status="200"\} (\S+)', text)
    return int(float(match.group(1))) if match else 0


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out ({timeout_s:.0f} s) waiting for {what}"
        time.sleep(0.05)


def _played_as_written(pod) -> None:
    """The container podman made has the Deployment's user, read-only root, memory limit and /tmp."""
    info = json.loads(kube_replicas.podman("inspect", pod.container).stdout)[0]
    docs = _docs()
    container = _container(docs)
    user = docs["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["Config"]["User"].split(":")[0] == str(user)
    assert info["HostConfig"]["Memory"] == _bytes(container["resources"]["limits"]["memory"])
    assert [m["Destination"] for m in info["Mounts"]] == ["/tmp"]


def _bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def _stop_under_load(replicas, balancer, load: Load, victim) -> dict:
    """Stop ``victim`` as the kubelet does while the load runs; times from the SIGTERM (the
    ``podman pod stop`` call): out of HAProxy's pool, and stopped (drained and exited)."""
    times: dict = {}

    def stop():
        times["term"] = time.monotonic()
        replicas.stop(victim)
        times["exited"] = replicas.exited_at[victim.name]

    stopper = threading.Thread(target=stop)
    stopper.start()
    _wait_for(lambda: "term" in times and balancer.servers()[victim.name]["status"].startswith("DOWN"), 30,
              "HAProxy to take the stopped replica out of its pool")
    times["out_of_pool"] = time.monotonic()
    stopper.join(kube_replicas.DEFAULT_GRACE_S + 60)
    assert not stopper.is_alive(), "podman pod stop did not return"
    times["answered_while_stopping"] = sum(times["term"] <= t <= times["exited"] for t in list(load.finished_at))
    return times


def test_two_replicas_lose_no_request_when_one_is_stopped_under_load(deployment, cases):
    replicas, balancer = deployment
    survivor, victim = replicas.pods
    for pod in replicas.pods:
        _played_as_written(pod)
    png = cases[0][0]
    octet = {"Content-Type": "application/octet-stream"}
    assert httpx.post(f"{balancer.url}/detect", content=png, headers=octet, timeout=30).status_code == 401
    assert httpx.post(f"{balancer.url}/detect", content=png, headers={**octet, "X-API-Key": "wrong"},
                      timeout=30).status_code == 401

    load = Load(balancer.url, replicas.api_key, cases)
    workers = [threading.Thread(target=load.worker, args=(k,), daemon=True) for k in range(WORKERS)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        _wait_for(lambda: load.done >= BEFORE_STOP, LOAD_DEADLINE_S / 2, f"{BEFORE_STOP} answers")
        before = {pod.name: _detect_200(pod.url) for pod in replicas.pods}
        times = _stop_under_load(replicas, balancer, load, victim)
        at_stop = load.done
        _wait_for(lambda: load.done >= at_stop + AFTER_STOP, LOAD_DEADLINE_S / 2, f"{AFTER_STOP} more answers")
    finally:
        load.stop.set()
        for worker in workers:
            worker.join(40)
    elapsed = time.monotonic() - started
    servers, frontend = balancer.servers(), balancer.frontend()
    survivor_2xx = int(servers[survivor.name]["hrsp_2xx"])
    _wait_for(lambda: _detect_200(survivor.url) >= survivor_2xx, 5, "the survivor's own count")  # counted after sending
    survivor_200 = _detect_200(survivor.url)
    assert httpx.get(f"{balancer.url}/ready", timeout=10).status_code == 200   # one replica still serves
    print(f"\nkube replicas: {load.done} requests in {elapsed:.1f} s, answered per replica before the stop "
          f"{before}, while stopping {times['answered_while_stopping']}; SIGTERM -> out of the pool "
          f"{times['out_of_pool'] - times['term']:.2f} s, -> exited {times['exited'] - times['term']:.2f} s; "
          f"HAProxy 2xx per server { {k: v['hrsp_2xx'] for k, v in servers.items()} }, "
          f"retries {sum(int(v['wretr'] or 0) for v in servers.values())}, "
          f"redispatches {sum(int(v['wredis'] or 0) for v in servers.values())}")

    assert not load.failures, (f"{len(load.failures)} of {load.done} requests failed: {load.failures[:5]}\n"
                               f"HAProxy's log:\n{balancer.log_summary()[-3000:]}\nthe stopped replica's "
                               f"log ends:\n{replicas.logs(victim)[-2000:]}")
    assert not load.mismatches, f"{len(load.mismatches)} answers differ from offline: {load.mismatches[:5]}"
    assert all(not worker.is_alive() for worker in workers)
    assert load.done >= BEFORE_STOP + AFTER_STOP
    # both replicas answered (their own counters), and the load went on while one was stopping
    assert all(n > 0 for n in before.values()), before
    assert times["answered_while_stopping"] > 0
    # HAProxy saw no 5xx; every 200 it sent came from a replica; the survivor's own count agrees
    assert frontend["hrsp_5xx"] == "0"
    assert int(frontend["hrsp_2xx"]) == sum(int(s["hrsp_2xx"]) for s in servers.values()) == load.done
    assert survivor_2xx == survivor_200
    assert int(servers[victim.name]["hrsp_2xx"]) >= before[victim.name] > 0
    # the stopped replica drained and exited by itself (0, not SIGKILL's 137), within the grace
    assert servers[victim.name]["status"].startswith("DOWN")
    assert times["out_of_pool"] - times["term"] < 5
    assert times["exited"] - times["term"] < kube_replicas.DEFAULT_GRACE_S
    assert replicas.exit_code(victim) == 0
    assert "stopped after SIGTERM" in replicas.logs(victim)
