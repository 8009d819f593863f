"""The HTTP service against a small real bundle, over real sockets.

The bundle is trained and fitted once per session (tests/service_fixtures.py);
the servers are real uvicorn servers on free local ports.  Expected values
come from ``Inspector.inspect`` run offline on the same pixels.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service_fixtures import (
    LiveServer, copy_bundle, fmnist_images, offline_inspector, png_of, to_uint8, encode,
)

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
TOL = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="session")
def bundle(service_bundle) -> Path:
    return service_bundle


@pytest.fixture(scope="module")
def server(bundle):
    from pathguard.service.settings import Settings

    with LiveServer(Settings(bundle=bundle, batch_wait_ms=5, torch_threads=1)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def multipart_files(images: torch.Tensor, names=None) -> list:
    names = names or [f"img{i}.png" for i in range(len(images))]
    return [("files", (name, png_of(image), "image/png")) for name, image in zip(names, images)]


def json_images(images: torch.Tensor, names=None) -> list[dict]:
    names = names or [f"img{i}.png" for i in range(len(images))]
    return [{"data": base64.b64encode(png_of(image)).decode(), "filename": name}
            for name, image in zip(names, images)]


def assert_matches(result: dict, expected, index: int | None = None) -> None:
    if index is not None:
        assert result["index"] == index
    assert result["predicted_class"] == expected.predicted_class
    assert result["label"] == expected.label
    assert result["adversarial"] == expected.adversarial
    assert result["confidence"] == pytest.approx(expected.confidence, **TOL)
    assert result["score"] == pytest.approx(expected.score, **TOL)
    assert result["threshold"] == pytest.approx(expected.threshold, rel=1e-12)
    assert result["active_fraction"] == pytest.approx(expected.active_fraction, **TOL)
    assert result["layer_deviations"] == pytest.approx(expected.layer_deviations, **TOL)
    evidence = result["evidence"]
    assert evidence["most_deviating"] == expected.evidence["most_deviating"]
    assert evidence["layer_classes"] == expected.evidence["layer_classes"]
    assert evidence["early_class"] == expected.evidence["layer_classes"][0]
    if expected.evidence["p_values"] is None:
        assert evidence["p_values"] is None
    else:
        assert evidence["p_values"] == pytest.approx(expected.evidence["p_values"], **TOL)


def metric_samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


# ----------------------------------------------------------- correctness


def test_real_image_matches_offline_inspection(client, bundle):
    images = fmnist_images(3)
    expected = offline_inspector(bundle).inspect(images)
    response = client.post("/detect", files=multipart_files(images[:1], ["shirt.png"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == offline_inspector(bundle).bundle.digest
    (result,) = body["results"]
    assert result["filename"] == "shirt.png"
    assert result["resized"] is False
    assert "layer_paths" not in result
    assert_matches(result, expected[0], index=0)
    assert set(result) == {"index", "filename", "predicted_class", "label", "confidence", "adversarial", "score",
                           "threshold", "layer_deviations", "active_fraction", "resized", "evidence"}


def test_multipart_and_json_give_identical_results(client):
    images = fmnist_images(10)[5:10]
    names = [f"item-{i}.png" for i in range(5)]
    a = client.post("/detect", files=multipart_files(images, names), params={"include_path": "true"})
    b = client.post("/detect", json={"images": json_images(images, names), "include_path": True})
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    assert [r["filename"] for r in a.json()["results"]] == names


def test_batch_gives_the_same_results_as_single_requests(client, bundle):
    images = fmnist_images(24)[16:24]
    expected = offline_inspector(bundle).inspect(images)
    batch = client.post("/detect", files=multipart_files(images)).json()["results"]
    assert [r["index"] for r in batch] == list(range(8))
    for i, image in enumerate(images):
        (single,) = client.post("/detect", files=multipart_files(image[None])).json()["results"]
        assert_matches(single, expected[i], index=0)
        assert_matches(batch[i], expected[i], index=i)


def test_include_path_returns_the_gate_bits(client, bundle):
    images = fmnist_images(2)
    inspector = offline_inspector(bundle)
    expected = inspector.inspect(images, include_path=True)
    response = client.post("/detect?include_path=true", files=multipart_files(images))
    widths = inspector.model.gated_widths
    for result, exp in zip(response.json()["results"], expected):
        paths = result["layer_paths"]
        assert [len(p) for p in paths] == widths
        assert paths == exp.layer_paths
        bits = [b for layer in paths for b in layer]
        assert set(bits) <= {0, 1}
        assert result["active_fraction"] == pytest.approx(sum(bits) / len(bits), **TOL)
        assert len(result["layer_deviations"]) == len(widths)


def test_wrong_size_is_refused_unless_resize_is_asked(client, bundle):
    image = fmnist_images(1)[0]
    big = Image.fromarray(to_uint8(image)).resize((56, 56), Image.BILINEAR)
    big_png = encode(big, "PNG")
    refused = client.post("/detect", files=[("files", ("big.png", big_png, "image/png"))])
    assert refused.status_code == 422
    assert "56x56 does not match the model's input 28x28" in refused.json()["detail"]
    assert "resize=true" in refused.json()["detail"]
    assert refused.json()["index"] == 0 and refused.json()["filename"] == "big.png"

    # What the server should compute: the training loaders' resize (fit_size: bilinear in float;
    # "pad", the default, is a plain resize for a square image), then inspect.
    from pathguard.detector.data import fit_size

    pixels = np.asarray(big, dtype=np.float32)[:, :, None] / 255.0
    back = fit_size(pixels, (28, 28), "pad")[:, :, 0]
    assert np.array_equal(back, fit_size(pixels, (28, 28), "stretch")[:, :, 0])
    expected = offline_inspector(bundle).inspect(torch.from_numpy(back)[None, None])[0]
    mixed = [("files", ("big.png", big_png, "image/png")), ("files", ("ok.png", png_of(image), "image/png"))]
    for kwargs in (
        {"files": mixed, "params": {"resize": "true"}},
        {"files": mixed, "data": {"resize": "true"}},
        {"json": {"images": [{"data": base64.b64encode(big_png).decode(), "filename": "big.png"},
                             {"data": base64.b64encode(png_of(image)).decode(), "filename": "ok.png"}],
                  "resize": True}},
    ):
        response = client.post("/detect", **kwargs)
        assert response.status_code == 200, response.text
        first, second = response.json()["results"]
        assert first["resized"] is True and second["resized"] is False
        assert_matches(first, expected)


# --------------------------------------------------------- concurrency


def test_concurrent_clients_each_get_their_own_results(bundle):
    from pathguard.service.settings import Settings

    images = fmnist_images(48)
    expected = offline_inspector(bundle).inspect(images)
    n_clients = 16
    # Client k sends images [3k, 3k + 1 + k % 3): different sizes and contents.
    plans = [list(range(3 * k, 3 * k + 1 + k % 3)) for k in range(n_clients)]
    settings = Settings(bundle=bundle, batching=True, batch_size=64, batch_wait_ms=50, torch_threads=1)
    with LiveServer(settings) as live:
        barrier = threading.Barrier(n_clients)
        answers: dict[int, httpx.Response] = {}

        def call(k: int) -> None:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                barrier.wait()
                answers[k] = c.post("/detect", files=multipart_files(images[plans[k]],
                                                                     [f"c{k}-{i}.png" for i in plans[k]]))

        threads = [threading.Thread(target=call, args=(k,)) for k in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        metrics = metric_samples(httpx.get(f"{live.url}/metrics").text)

    assert sorted(answers) == list(range(n_clients))
    for k, response in answers.items():
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["filename"] for r in results] == [f"c{k}-{i}.png" for i in plans[k]]
        for result, i in zip(results, plans[k]):
            assert_matches(result, expected[i])
    n_images = sum(len(p) for p in plans)
    batches = metrics[("pathguard_batch_size_count", frozenset())]
    assert metrics[("pathguard_batch_size_sum", frozenset())] == n_images
    assert batches < n_clients, "no two requests were coalesced into one forward pass"


def test_backpressure_gives_503_with_retry_after_and_never_500(bundle):
    from pathguard.service.settings import Settings

    settings = Settings(bundle=bundle, queue_size=1, max_images=1, batch_wait_ms=400, retry_after_s=2,
                        torch_threads=1)
    image = png_of(fmnist_images(1)[0])
    with LiveServer(settings) as live:
        barrier = threading.Barrier(8)
        statuses: list[httpx.Response] = []

        def call() -> None:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                barrier.wait()
                statuses.append(c.post("/detect", files=[("files", ("a.png", image, "image/png"))]))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        codes = sorted(r.status_code for r in statuses)
        assert len(codes) == 8
        assert set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        for r in statuses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "2"
                assert "server busy" in r.json()["detail"]
        assert httpx.get(f"{live.url}/health").status_code == 200
        metrics = metric_samples(httpx.get(f"{live.url}/metrics").text)
        assert metrics[("pathguard_rejected_total", frozenset({("reason", "overloaded")}))] == codes.count(503)


def test_inference_time_limit_gives_503_with_retry_after(bundle):
    from pathguard.service.settings import Settings

    # The batch waits 1.5 s to fill, longer than the 0.2 s limit.
    settings = Settings(bundle=bundle, inference_timeout_s=0.2, batch_wait_ms=1500, torch_threads=1)
    with LiveServer(settings) as live:
        response = httpx.post(f"{live.url}/detect", files=multipart_files(fmnist_images(1)), timeout=30)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "did not finish within 0.2 s" in response.json()["detail"]
        assert httpx.get(f"{live.url}/health").status_code == 200


# --------------------------------------------------- operational endpoints


def test_health_ready_model_and_metrics(client, bundle):
    inspector = offline_inspector(bundle)
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": inspector.bundle.digest}

    model = client.get("/model").json()
    assert model["name"] == "bundle"
    assert model["digest"] == inspector.bundle.digest
    assert model["classes"] == list(inspector.bundle.classes)
    assert model["classes"][0] == "T-shirt/top"
    assert model["input_shape"] == [1, 28, 28]
    assert model["gated_widths"] == inspector.model.gated_widths
    assert model["path_bits"] == sum(inspector.model.gated_widths)
    assert model["detector"] == {"score": "layer-gauss-conf", "threshold": inspector.detector.threshold_,
                                 "target_fpr": 0.05}
    assert model["card"]["test"]["decoupled_accuracy"] == inspector.bundle.card["test"]["decoupled_accuracy"]
    assert model["limits"]["max_images"] == 32
    assert model["batching"]["enabled"] is True
    assert model["engine"] == "sparse"  # `auto` on the CPU: image by image, off filters skipped

    before = metric_samples(client.get("/metrics").text)
    images = fmnist_images(4)
    results = client.post("/detect", files=multipart_files(images)).json()["results"]
    client.get("/detect")  # a 405, counted too
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = metric_samples(response.text)

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("pathguard_requests_total", endpoint="/detect", method="POST", status="200") == 1
    assert delta("pathguard_requests_total", endpoint="/detect", method="GET", status="405") == 1
    assert delta("pathguard_images_scored_total") == 4
    assert delta("pathguard_images_flagged_total") == sum(r["adversarial"] for r in results)
    assert delta("pathguard_batch_size_sum") == 4
    assert delta("pathguard_request_duration_seconds_count", endpoint="/detect") == 2
    assert after[("pathguard_model_info", frozenset({("name", "bundle"), ("digest", inspector.bundle.digest),
                                                     ("score", "layer-gauss-conf")}))] == 1
    # the server process's garbage collections are timed (the test process runs it, so force one)
    import gc
    gc.collect(2)
    collections = metric_samples(client.get("/metrics").text)
    assert collections.get(("pathguard_gc_pause_seconds_count", frozenset({("generation", "2")})), 0) >= 1


def test_openapi_documents_both_request_forms_with_examples(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json", "application/octet-stream"}
    assert body["multipart/form-data"]["schema"]["required"] == ["files"]
    schemas = spec["components"]["schemas"]
    assert schemas["DetectRequest"]["additionalProperties"] is False
    assert schemas["DetectRequest"]["examples"]
    assert "examples" in schemas["ImageResult"]["properties"]["score"]
    assert "422" in spec["paths"]["/detect"]["post"]["responses"]
    # The example in the docs really is a valid image for this model.
    example = body["application/json"]["example"]
    response = client.post("/detect", json=example)
    assert response.status_code == 200, response.text


def test_api_key_guards_detect_model_and_optionally_metrics(bundle):
    from pathguard.service.settings import Settings

    key = "s3cret-key-for-tests"
    settings = Settings(bundle=bundle, api_key=key, protect_metrics=True, torch_threads=1)
    assert key not in repr(settings) and key not in str(settings.model_dump())
    files = multipart_files(fmnist_images(1))
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        seen = []
        for path in ("/detect", "/model", "/metrics"):
            method = c.post if path == "/detect" else c.get
            kwargs = {"files": files} if path == "/detect" else {}
            missing = method(path, **kwargs)
            wrong = method(path, headers={"X-API-Key": "wrong"}, **kwargs)
            wrong_bearer = method(path, headers={"Authorization": "Bearer wrong"}, **kwargs)
            for r in (missing, wrong, wrong_bearer):
                assert r.status_code == 401, (path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
            assert "missing API key" in missing.json()["detail"]
            assert wrong.json()["detail"] == "invalid API key"
            ok = method(path, headers={"X-API-Key": key}, **kwargs)
            bearer = method(path, headers={"Authorization": f"Bearer {key}"}, **kwargs)
            assert ok.status_code == bearer.status_code == 200, (path, ok.text)
            seen += [missing, wrong, wrong_bearer, ok, bearer]
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        for r in seen:
            assert key not in r.text and key not in str(r.headers)

    # Without protect_metrics, /metrics stays open while /detect is guarded.
    with LiveServer(Settings(bundle=bundle, api_key=key, torch_threads=1)) as live:
        assert httpx.get(f"{live.url}/metrics").status_code == 200
        assert httpx.get(f"{live.url}/model").status_code == 401


def test_no_api_key_means_open_access(client):
    assert client.get("/model").status_code == 200
    assert client.post("/detect", files=multipart_files(fmnist_images(1))).status_code == 200


def test_access_is_a_real_dependency_that_dependency_overrides_replaces(bundle):
    from pathguard.service.dependencies import require_key
    from pathguard.service.settings import Settings

    settings = Settings(bundle=bundle, api_key="s3cret-key-for-tests", protect_metrics=True, torch_threads=1)
    live = LiveServer(settings)
    live.app.dependency_overrides[require_key] = lambda: None
    image = fmnist_images(1)
    with live, httpx.Client(base_url=live.url, timeout=60) as c:
        detect = c.post("/detect", files=multipart_files(image))
        assert detect.status_code == 200, detect.text
        assert_matches(detect.json()["results"][0], offline_inspector(bundle).inspect(image)[0], index=0)
        assert c.get("/model").status_code == 200
        # /metrics has its own dependency, which is not overridden: still guarded.
        assert c.get("/metrics").status_code == 401


# ----------------------------------------------------------- lifecycle


def _start_lifespan(app):
    async def run():
        async with app.router.lifespan_context(app):
            pass

    asyncio.run(run())


def test_tampered_or_incomplete_bundle_stops_startup(bundle, tmp_path):
    from pathguard.detector.bundle import update_bundle_card
    from pathguard.service.app import BundleError, create_app
    from pathguard.service.settings import Settings

    tampered = copy_bundle(bundle, tmp_path / "tampered")
    weights = tampered / "decoupled.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"cannot serve bundle .*decoupled\.safetensors: SHA-256 mismatch"):
        _start_lifespan(create_app(Settings(bundle=tampered)))

    missing = copy_bundle(bundle, tmp_path / "missing")
    (missing / "profile.safetensors").unlink()
    with pytest.raises(BundleError, match=r"profile\.safetensors: listed in the manifest but missing"):
        _start_lifespan(create_app(Settings(bundle=missing)))

    with pytest.raises(BundleError, match="bundle directory not found"):
        _start_lifespan(create_app(Settings(bundle=tmp_path / "nowhere")))

    # Detector files the manifest does not list would load unverified: refused.
    unlisted = copy_bundle(bundle, tmp_path / "unlisted")
    manifest = json.loads((unlisted / "manifest.json").read_text())
    del manifest["files"]["profile.json"]
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="profile files are not listed in the manifest"):
        _start_lifespan(create_app(Settings(bundle=unlisted)))

    # A pinned digest: the right one starts, any other bundle does not.
    digest = offline_inspector(bundle).bundle.digest
    _start_lifespan(create_app(Settings(bundle=bundle, expected_digest=digest.upper())))
    other = copy_bundle(bundle, tmp_path / "other")
    update_bundle_card(other, {"note": "a valid bundle, but another one"})
    with pytest.raises(BundleError, match="is not the expected"):
        _start_lifespan(create_app(Settings(bundle=other, expected_digest=digest)))

    # A live server refuses to start at all rather than serve half a model.
    live = LiveServer(Settings(bundle=tampered))
    with pytest.raises(RuntimeError, match="exited during startup"):
        live.start()
    live.socket.close()


def test_cli_refuses_a_tampered_bundle_with_a_clear_message(bundle, tmp_path, capsys):
    from pathguard.cli import main

    tampered = copy_bundle(bundle, tmp_path / "tampered")
    (tampered / "model_card.json").write_text("{}")
    assert main(["serve", "--bundle", str(tampered), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot serve bundle" in err and "model_card.json: SHA-256 mismatch" in err


def test_ready_is_503_until_the_model_is_loaded(bundle):
    from pathguard.service.app import create_app
    from pathguard.service.settings import Settings

    app = create_app(Settings(bundle=bundle))

    async def run():
        # No lifespan has run: the model is not loaded.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health"), await c.get("/ready"), await c.post(
                "/detect", files=multipart_files(fmnist_images(1)))

    health, ready, detect = asyncio.run(run())
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["status"] == "starting"
    assert detect.status_code == 503 and detect.json()["detail"] == "model is not loaded yet"


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(bundle):
    env = dict(os.environ, PATHGUARD_BUNDLE=str(bundle), PATHGUARD_PORT="0", PATHGUARD_BATCH_WAIT_MS="3000",
               PATHGUARD_TORCH_THREADS="1", PATHGUARD_LOG_LEVEL="info")
    proc = subprocess.Popen([sys.executable, "-m", "pathguard.service.server"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        port = None
        deadline = time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            line = lines.get(timeout=90)
            assert line is not None, "server exited during startup:\n" + "".join(log)
            log.append(line)
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "".join(log)
        url = f"http://127.0.0.1:{port}"
        image = fmnist_images(1)
        outcome = {}

        def slow_request():
            outcome["response"] = httpx.post(f"{url}/detect", files=multipart_files(image), timeout=60)

        request = threading.Thread(target=slow_request)
        request.start()
        # Wait until the request sits in the batcher (it waits 3 s to fill).
        with httpx.Client(base_url=url, timeout=10) as c:
            for _ in range(200):
                if "pathguard_queue_images 1.0" in c.get("/metrics").text:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the request never reached the batcher")
        proc.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        log.append(line)
    text = "".join(log)
    response = outcome["response"]
    assert response.status_code == 200, text
    expected = offline_inspector(bundle).inspect(image)[0]
    assert_matches(response.json()["results"][0], expected)
    assert code == 0, text
    assert "draining" in text and "Finished server process" in text


# ------------------------------------------------------------ the parts


def test_settings_from_environment_and_validation(monkeypatch, bundle):
    from pydantic import ValidationError

    from pathguard.service.settings import Settings

    monkeypatch.setenv("PATHGUARD_BUNDLE", str(bundle))
    monkeypatch.setenv("PATHGUARD_MAX_IMAGES", "5")
    monkeypatch.setenv("PATHGUARD_API_KEY", "")
    monkeypatch.setenv("PATHGUARD_BATCHING", "false")
    s = Settings()
    assert (s.bundle, s.max_images, s.api_key, s.batching) == (bundle, 5, None, False)
    assert s.batch_wait_s == 0.0  # batches fill while the worker is busy; a lone image does not wait
    for bad in ({"port": -1}, {"port": 70000}, {"max_images": 0}, {"batch_size": 0}, {"batch_wait_ms": -1},
                {"inference_timeout_s": 0}, {"queue_size": 4, "max_images": 5}, {"max_upload_bytes": 10},
                {"alpha_background": 256}, {"api_key": " padded "}, {"unknown_option": 1},
                {"log_level": "loud"}, {"expected_digest": "abc"}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_cli_options_override_the_environment(monkeypatch, bundle):
    from pathguard.cli import build_parser, config_from_args
    from pathguard.jobs import serve

    monkeypatch.setenv("PATHGUARD_PORT", "9999")
    monkeypatch.setenv("PATHGUARD_HOST", "0.0.0.0")
    args = build_parser().parse_args(["serve", "--bundle", str(bundle), "--port", "8123", "--no-batching"])
    s = serve.settings_from(config_from_args(serve.Config, args))
    assert (s.bundle, s.port, s.host, s.batching) == (bundle, 8123, "0.0.0.0", False)


def test_micro_batcher_coalesces_splits_orders_and_drains():
    from pathguard.service.batching import MicroBatcher, Overloaded

    passes: list[list[float]] = []

    def infer(images: torch.Tensor, include_path: bool) -> list[float]:
        passes.append(images.flatten().tolist())
        time.sleep(0.01)
        return [float(v) * 10 for v in images.flatten()]

    async def scenario(coalesce: bool):
        passes.clear()
        batcher = MicroBatcher(infer, max_batch=4, max_wait_s=0.05, max_queue=16, coalesce=coalesce)
        await batcher.start()
        requests = [torch.arange(s, s + n, dtype=torch.float32) for s, n in ((0, 1), (10, 2), (20, 6), (30, 1))]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        with pytest.raises(Overloaded):
            await asyncio.gather(*(batcher.submit(torch.zeros(9)) for _ in range(2)))
        late = asyncio.ensure_future(batcher.submit(torch.tensor([99.0])))
        await asyncio.sleep(0)
        await batcher.close()  # drains: the late request is still answered
        return requests, results, await late, list(passes)

    requests, results, late, coalesced = asyncio.run(scenario(True))
    for request, result in zip(requests, results):
        assert result == [float(v) * 10 for v in request]
    assert late == [990.0]
    assert max(len(p) for p in coalesced) == 4  # never more than max_batch per pass
    assert len(coalesced[0]) > 1  # requests were coalesced
    # Request (20, 6) was split into chunks of 4 and 2, in order.
    flat = [v for p in coalesced for v in p]
    assert [v for v in flat if 20 <= v < 26] == [20, 21, 22, 23, 24, 25]

    requests, results, late, separate = asyncio.run(scenario(False))
    for request, result in zip(requests, results):
        assert result == [float(v) * 10 for v in request]
    # No coalescing: every pass holds images of one request only.
    assert all(len({int(v) // 10 for v in p}) == 1 for p in separate)


def test_micro_batcher_keeps_several_workers_busy_and_drains_them():
    """With two workers: two batches are in flight at once, a lone request is
    shared out between the free workers in whole pieces, every request's
    results come back in its own order, and close() answers the batches in
    flight before it returns."""
    import threading

    from pathguard.service.batching import MicroBatcher

    passes: list[tuple[list[float], float, float]] = []
    lock = threading.Lock()

    def infer(images: torch.Tensor, include_path: bool) -> list[float]:
        started = time.monotonic()
        time.sleep(0.05)
        with lock:
            passes.append((images.flatten().tolist(), started, time.monotonic()))
        return [float(v) * 10 for v in images.flatten()]

    async def scenario():
        batcher = MicroBatcher(infer, max_batch=16, max_wait_s=0.0, max_queue=64, workers=2, piece=4)
        await batcher.start()
        lone = torch.arange(0, 16, dtype=torch.float32)
        lone_result = await batcher.submit(lone)
        lone_passes = list(passes)
        passes.clear()
        requests = [torch.arange(100 * k, 100 * k + n, dtype=torch.float32) for k, n in enumerate((3, 9, 1, 16, 5), 1)]
        pending = [asyncio.ensure_future(batcher.submit(r)) for r in requests]
        await asyncio.sleep(0.01)
        await batcher.close()  # the batches in flight and those queued are still answered
        return lone, lone_result, lone_passes, requests, [p.result() for p in pending], list(passes)

    lone, lone_result, lone_passes, requests, results, later = asyncio.run(scenario())
    assert lone_result == [float(v) * 10 for v in lone]
    # the lone request of 16 went to both workers, 8 images each (two pieces of 4), at the same time
    assert sorted(len(images) for images, _, _ in lone_passes) == [8, 8]
    (_, start_a, end_a), (_, start_b, end_b) = lone_passes
    assert start_a < end_b and start_b < end_a, "the two halves did not run side by side"
    for request, result in zip(requests, results):
        assert result == [float(v) * 10 for v in request]
    assert max(len(images) for images, _, _ in later) <= 16
    overlapping = any(a[1] < b[2] and b[1] < a[2] for i, a in enumerate(later) for b in later[i + 1:])
    assert overlapping, "no two batches were in flight at once"


def test_inference_workers_and_threads_leave_the_event_loop_a_core(monkeypatch, tmp_path):
    """One single-thread inference process per usable core (at most four);
    their torch threads share torch's default less the one core the event
    loop keeps (at least one each); explicit settings win."""
    from pathguard.service import state as service_state
    from pathguard.service.settings import Settings

    settings = Settings(bundle=tmp_path)
    monkeypatch.setattr(service_state, "usable_cpus", lambda: 2)
    monkeypatch.setattr(service_state.torch, "get_num_threads", lambda: 2)
    assert (service_state.inference_workers(settings), service_state.worker_threads(settings)) == (2, 1)
    monkeypatch.setattr(service_state, "usable_cpus", lambda: 1)
    assert (service_state.inference_workers(settings), service_state.worker_threads(settings)) == (1, 1)
    monkeypatch.setattr(service_state, "usable_cpus", lambda: 16)
    assert (service_state.inference_workers(settings), service_state.worker_threads(settings)) == (4, 1)
    monkeypatch.setattr(service_state.torch, "get_num_threads", lambda: 16)
    assert service_state.worker_threads(settings) == 3  # 15 cores left, shared by 4 workers
    one = Settings(bundle=tmp_path, inference_workers=1)
    assert (service_state.inference_workers(one), service_state.worker_threads(one)) == (1, 15)
    assert service_state.worker_threads(Settings(bundle=tmp_path, torch_threads=3)) == 3
    assert service_state.inference_workers(Settings(bundle=tmp_path, inference_process=False)) == 1
    with pytest.raises(ValueError, match="inference_workers > 1 needs inference_process"):
        Settings(bundle=tmp_path, inference_process=False, inference_workers=2)


def test_the_start_up_heap_is_frozen_in_the_server_and_in_each_worker(server, bundle):
    """A full garbage collection over torch's and the app's objects stalled
    the event loop for 150-190 ms under load: the server freezes its heap
    after start-up (this process runs it), and each worker after its warm-up."""
    import gc
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pathguard.detector.bundle import load_bundle
    from pathguard.service import state as service_state

    assert gc.get_freeze_count() > 10_000  # torch, the model, the app
    digest = load_bundle(bundle).digest
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=service_state._worker_init,
                             initargs=(str(bundle), digest, 8, 1)) as pool:
        pid, frozen, sizes = pool.submit(service_state._worker_warm_up, np.zeros((1, 1, 28, 28), np.float32)).result()
    assert pid != os.getpid() and frozen > 10_000
    assert sizes[-1] == 8  # the worker measured its pass sizes during the warm-up, the full pass last


def test_micro_batcher_with_two_workers_drops_timed_out_pieces_and_keeps_its_count():
    """A request that times out while both workers are busy is never run, its
    pieces leave the queue, and the pending count returns to zero."""
    from pathguard.service.batching import InferenceTimeout, MicroBatcher

    seen: list[float] = []

    def infer(images: torch.Tensor, include_path: bool) -> list[float]:
        time.sleep(0.2)
        seen.extend(images.flatten().tolist())
        return images.flatten().tolist()

    async def scenario():
        batcher = MicroBatcher(infer, max_batch=8, max_wait_s=0.0, max_queue=64, workers=2, piece=4)
        await batcher.start()
        busy = [asyncio.ensure_future(batcher.submit(torch.full((8,), float(k)))) for k in (1, 2)]
        await asyncio.sleep(0.05)  # both workers now hold a batch for 0.2 s
        with pytest.raises(InferenceTimeout):
            await batcher.submit(torch.full((12,), 7.0), timeout=0.05)
        done = await asyncio.gather(*busy)
        after = await batcher.submit(torch.full((3,), 9.0))
        pending = batcher.pending
        await batcher.close()
        return done, after, pending

    done, after, pending = asyncio.run(scenario())
    assert done == [[1.0] * 8, [2.0] * 8] and after == [9.0] * 3
    assert 7.0 not in seen  # the timed-out request's pieces never reached a worker
    assert pending == 0
