"""The deployable image: build it with podman, run it, ask it, stop it.

Slow (minutes on a fresh machine: debootstrap base image, wheelhouse); the
base image and the wheelhouse are cached between runs on one machine.
scripts/test.sh installs podman, runc and debootstrap, so this never skips.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
from PIL import Image

from pathguard.detector.data import load_dataset
from pathguard.detector.inspection import Inspector

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8"), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_container_answers_detect(citest_image):
    """Built by docker/build.sh (the session's citest_image fixture, shared
    with the Kubernetes test), run, asked, stopped."""
    tag, build_seconds, podman_env = citest_image
    built = time.time()
    port = _free_port()
    name = f"pathguard-citest-{os.getpid()}"
    subprocess.run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", tag],
                   env=podman_env, check=True, stdout=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, subprocess.run(
                ["podman", "logs", name], env=podman_env, capture_output=True, text=True).stderr[-3000:]
            time.sleep(1)

        # A real test image that the shipped model classifies right and does not flag offline.
        test = load_dataset("fashion-mnist", "test").head(50)
        offline = Inspector.load(ROOT / "bundles" / "fmnist-default").inspect(test.images)
        i = next(k for k, r in enumerate(offline) if r.predicted_class == int(test.labels[k]) and not r.adversarial)
        response = httpx.post(f"{base}/detect", files=[("files", ("shirt.png", _png(test.images[i]), "image/png"))],
                              timeout=30)
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert result["predicted_class"] == int(test.labels[i])
        assert result["adversarial"] is False
        assert abs(result["score"] - offline[i].score) < 1e-3 * max(1.0, abs(offline[i].score))

        uid = subprocess.run(["podman", "exec", name, "id", "-u"], env=podman_env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert uid != "0", "the service must not run as root in the container"
        print(f"container test: build {build_seconds:.0f} s, run+check {time.time() - built:.0f} s")
    finally:
        subprocess.run(["podman", "stop", "-t", "10", name], env=podman_env, capture_output=True)
        subprocess.run(["podman", "rm", "-f", name], env=podman_env, capture_output=True)
