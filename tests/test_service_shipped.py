"""The service on the shipped bundle: a clean image comes back with its true
class, unflagged; its PGD version comes back flagged exactly when the
detector flags it offline, with the same score."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from pathguard.attacks.generate import generate_attack_set
from pathguard.detector.bundle import DEFAULT_BUNDLE
from pathguard.detector.data import load_dataset
from pathguard.detector.inspection import Inspector
from pathguard.service.app import create_app
from pathguard.service.settings import Settings
from service_fixtures import png_of


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(bundle=DEFAULT_BUNDLE, torch_threads=1))) as c:
        yield c


def _post(client, images):
    files = [("files", (f"img-{i}.png", png_of(x), "image/png")) for i, x in enumerate(images)]
    response = client.post("/detect", files=files)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_clean_and_pgd_images_on_the_shipped_bundle(client):
    inspector = Inspector.load(DEFAULT_BUNDLE)
    test = load_dataset("fashion-mnist", "test").head(80)
    offline = inspector.inspect(test.images)
    keep = [i for i, r in enumerate(offline) if r.predicted_class == int(test.labels[i]) and not r.adversarial][:24]
    images, labels = test.images[keep], test.labels[keep]

    for result, label in zip(_post(client, images), labels):
        assert result["predicted_class"] == int(label) and result["adversarial"] is False

    adversarial = generate_attack_set(inspector.model, images, labels, "pgd", seed=0, progress=False).adversarial
    adversarial = torch.round(adversarial * 255) / 255  # what a PNG carries
    expected = inspector.inspect(adversarial)
    results = _post(client, adversarial)
    assert any(e.adversarial for e in expected), "no PGD example is flagged offline: the test would prove nothing"
    for result, exp in zip(results, expected):
        assert result["adversarial"] == exp.adversarial
        assert result["predicted_class"] == exp.predicted_class
        assert result["score"] == pytest.approx(exp.score, rel=1e-4, abs=1e-4)
