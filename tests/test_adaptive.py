"""The detector-aware attack really works against the detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathguard.attacks.adaptive import AdaptivePGD, LayerTargets, surrogate_fidelity, surrogate_score
from pathguard.detector.data import load_dataset
from pathguard.detector.models import Architecture, ConvNet
from pathguard.detector.paths import extract_paths, observe
from pathguard.detector.detectors import make_detector


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    arch = Architecture("tiny", 1, 28, 10, (8, "M", 16, 16, "M"), mean=(0.286,), std=(0.353,))
    model = ConvNet(arch, gated=True)
    # Random ACMs, so that paths really vary with the input.
    for block in model.blocks:
        if block.control is not None:
            torch.nn.init.normal_(block.control.fc1.weight, std=1.0)
            block.control.fc2.reset_parameters()  # PyTorch's default init, not the all-on one
            torch.nn.init.normal_(block.control.fc2.bias, std=0.5)
    data = load_dataset("fashion-mnist", "train").head(1400)
    # A quick supervised fit so that predictions (and hence class profiles) mean something.
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    model.gate_noise = 0.0
    for _ in range(3):
        for i in range(0, 1000, 100):
            loss = torch.nn.functional.cross_entropy(model(data.images[i:i + 100]), data.labels[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    detector = make_detector("layer-gauss-conf")
    detector.fit(extract_paths(model, data.images[:1000]))
    detector.calibrate(extract_paths(model, data.images[1000:1300]))
    return model, detector, data.subset(torch.arange(1300, 1400))


def test_adaptive_attack_lowers_the_score_compared_with_plain_pgd(setup):
    model, detector, probe = setup
    results = {}
    for lam in (0.0, 5.0):
        torch.manual_seed(0)
        attack = AdaptivePGD(model, detector, eps=0.1, alpha=0.01, steps=20, lam=lam)
        adv = attack(probe.images, probe.labels)
        assert (adv - probe.images).abs().max() <= 0.1 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        results[lam] = detector.score_samples(extract_paths(model, adv))
    assert np.median(results[5.0]) < np.median(results[0.0])
    assert (results[5.0] <= detector.threshold_).mean() > (results[0.0] <= detector.threshold_).mean()


def test_surrogate_is_differentiable_and_tracks_the_real_score(setup):
    model, detector, probe = setup
    x = probe.images.clone().requires_grad_(True)
    surrogate_score(detector, model, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    real = detector.score_samples(extract_paths(model, probe.images))
    # The soft score tracks the real one at the attack's temperature, and
    # converges to it as the temperature goes to 0.
    assert surrogate_fidelity(detector, model, probe.images, 0.1, real)["pearson"] > 0.5
    assert surrogate_fidelity(detector, model, probe.images, 0.001, real)["pearson"] > 0.99


def test_invalid_settings_are_rejected(setup):
    model, detector, _ = setup
    with pytest.raises(ValueError):
        AdaptivePGD(model, detector, eps=-1)
    with pytest.raises(ValueError, match="calibrated"):
        AdaptivePGD(model, make_detector("layer-gauss-conf"))


def test_adaptive_attack_on_a_channel_score_lowers_it(setup):
    """Against detector v2 (the first block's value check and the
    confidence, read from every block): the detector term lowers the score."""
    model, _, probe = setup
    data = load_dataset("fashion-mnist", "train").head(1300)
    fusion = make_detector("fusion", max_fit=1000).fit(observe(model, data.images[:1000], labels=data.labels[:1000],
                                                                blocks=True))
    fusion.calibrate(observe(model, data.images[1000:1300], blocks=True))
    scores = {}
    for lam in (0.0, 5.0):
        torch.manual_seed(0)
        adv = AdaptivePGD(model, fusion, eps=0.1, alpha=0.01, steps=20, lam=lam)(probe.images, probe.labels)
        scores[lam] = fusion.score_samples(observe(model, adv, blocks=True))
    # the hinge pulls only scores near or over the threshold: fewer are flagged, and those that were come down
    assert fusion.flag(scores[5.0]).mean() < fusion.flag(scores[0.0]).mean()
    assert scores[5.0].mean() < scores[0.0].mean()


def test_layer_mimicking_pulls_every_layer_toward_the_target_class(setup):
    model, detector, probe = setup
    data = load_dataset("fashion-mnist", "train").head(1000)
    targets = LayerTargets.fit(observe(model, data.images, labels=data.labels, blocks=True))
    assert targets.names == ["block0", "block1", "block2", "gates0", "gates1"]
    # the class means are the means of each class's rows
    clean = observe(model, data.images, labels=data.labels, blocks=True)
    ones = data.labels == 1
    assert torch.allclose(targets.means[1][1], clean.blocks[1][ones].double().mean(0))
    with torch.no_grad():
        logits = model(probe.images)
    wrong = logits.scatter(1, probe.labels[:, None], float("-inf")).argmax(1)
    distances = {}
    for mimic in (0.0, 3.0):
        torch.manual_seed(0)
        attack = AdaptivePGD(model, detector, eps=0.1, alpha=0.01, steps=20, lam=1.0, mimic=mimic, targets=targets)
        adv = attack(probe.images, probe.labels)
        assert (adv - probe.images).abs().max() <= 0.1 + 1e-6
        distances[mimic] = targets.distance(observe(model, adv, blocks=True), wrong)
    assert distances[3.0].median() < distances[0.0].median()
    with pytest.raises(ValueError, match="targets"):
        AdaptivePGD(model, detector, mimic=1.0)
