"""One contract for every registered detector, path scores and baselines
alike (detector/base.py): fit on clean data (supervised ones also on
adversarial), one finite score per image with larger = more suspicious,
predict exactly score > calibrated threshold, and a pickle-free save/load
round trip that gives identical scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pathguard.detector.artifacts import atomic_save_tensors, load_tensors
from pathguard.detector.base import Detector, NotFittedError
from pathguard.detector.detectors import DETECTORS, make_detector
from pathguard.detector.paths import PathBatch

WIDTHS = [6, 10]
CLASSES = 3


def observations(n: int, seed: int, outlier: bool = False) -> PathBatch:
    """Class-structured clean rows, or rows that are off in every view a
    detector can read: flipped paths and gate logits, unsure logits,
    features far from every class, full-rank activations where clean ones
    lie on a 2-D manifold."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(1234)  # the same classes for every call
    prototypes = (torch.rand(CLASSES, sum(WIDTHS), generator=fixed) < 0.5).float()
    centres = 4 * torch.randn(CLASSES, 4, generator=fixed)
    basis = [torch.randn(2, 30, generator=fixed), torch.randn(2, 12, generator=fixed)]
    labels = torch.arange(n) % CLASSES
    flips = (torch.rand(n, sum(WIDTHS), generator=gen) < 0.05).float()
    paths = (prototypes[labels] + flips) % 2
    logits = torch.full((n, CLASSES), -2.0)
    logits[torch.arange(n), labels] = 4.0
    features = centres[labels] + 0.5 * torch.randn(n, 4, generator=gen)
    latent = torch.randn(n, 2, generator=gen)
    acts = [latent @ b + 0.01 * torch.randn(n, b.shape[1], generator=gen) for b in basis]
    if outlier:
        paths = 1 - paths
        logits = logits.clone()
        logits[torch.arange(n), labels] = -1.9
        features = features + 12.0
        acts = [torch.randn(n, b.shape[1], generator=gen) * a.std() for a, b in zip(acts, basis)]
    gate_logits = (paths * 2 - 1) * 3 + 0.3 * torch.randn(n, sum(WIDTHS), generator=gen)
    logits = logits + 0.1 * torch.randn(n, CLASSES, generator=gen)
    # every block's pooled features (detector v2 and mahalanobis-multi read them): the class-carrying
    # features beside part of each activation
    blocks = [torch.cat([features, a[:, :4]], 1) for a in acts]
    # and their spreads over space (fusion-moments reads the first): larger for the outliers
    spreads = [a[:, 4:8].abs() + 0.1 for a in acts]
    return PathBatch(logits, paths, gate_logits, features, list(WIDTHS), labels=labels,
                     blocks=blocks, activations=acts + [features, logits], spreads=spreads)


# Detectors whose defaults do not make a detector: what they are given here.
PARAMS = {"channels": {"channels": ("value:block1", "evidence:gates1", "confidence")}}


def fitted(name: str) -> Detector:
    detector = make_detector(name, **PARAMS.get(name, {}))
    clean = observations(400, seed=0)
    if detector.supervised:
        detector.fit(clean, observations(200, seed=1, outlier=True))
    else:
        detector.fit(clean)
    return detector.calibrate(observations(300, seed=2))


def test_every_detector_is_registered():
    assert {"bernoulli", "jaccard", "logit-gauss", "layer-gauss", "layer-gauss-conf", "logit-gauss-conf",
            "logit-gauss-max", "path-supervised", "max-softmax", "mahalanobis", "lid"} <= set(DETECTORS)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_contract(name, tmp_path):
    detector = fitted(name)
    clean, odd = observations(150, seed=3), observations(150, seed=4, outlier=True)
    clean_scores, odd_scores = detector.score_samples(clean), detector.score_samples(odd)
    # one finite float per image
    assert clean_scores.shape == (150,) and clean_scores.dtype == np.float64
    assert np.isfinite(clean_scores).all() and np.isfinite(odd_scores).all()
    # larger = more suspicious
    assert np.median(odd_scores) > np.quantile(clean_scores, 0.9), name
    # predict is exactly score > threshold_, the threshold near the target FPR
    assert np.array_equal(detector.predict(odd), odd_scores > detector.threshold_)
    assert detector.predict(clean).mean() <= detector.target_fpr + 0.08
    # save and load without pickle: safetensors + JSON
    atomic_save_tensors(tmp_path / "state.safetensors", detector.state_tensors())
    config = json.loads(json.dumps(detector.config()))
    loaded = Detector.from_saved(config, load_tensors(tmp_path / "state.safetensors"))
    assert type(loaded) is type(detector) and loaded.get_params() == detector.get_params()
    assert loaded.threshold_ == detector.threshold_
    assert np.array_equal(loaded.score_samples(odd), odd_scores)
    assert np.array_equal(loaded.predict(clean), detector.predict(clean))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_unfitted_and_uncalibrated_detectors_refuse_to_score(name):
    detector = make_detector(name, **PARAMS.get(name, {}))
    with pytest.raises(NotFittedError):
        detector.score_samples(observations(5, seed=0))
    detector = fitted(name)
    detector.threshold_ = None
    with pytest.raises(NotFittedError, match="calibrate"):
        detector.predict(observations(5, seed=0))


@pytest.mark.parametrize("name", sorted(n for n, cls in DETECTORS.items() if cls.supervised))
def test_supervised_detectors_need_adversarial_examples(name):
    with pytest.raises(ValueError, match="supervised"):
        make_detector(name).fit(observations(300, seed=0))


def test_a_detector_that_needs_activations_says_so():
    batch = observations(300, seed=0)
    batch.activations = []
    with pytest.raises(ValueError, match="activations"):
        make_detector("lid").fit(batch, observations(100, seed=1, outlier=True))


def test_refitting_clears_the_threshold():
    detector = fitted("jaccard")
    assert detector.threshold_ is not None
    detector.fit(observations(100, seed=5))
    assert detector.threshold_ is None
