"""A refactoring must not change what the shipped bundle answers: scores,
flags, predictions, layer deviations and the most deviating check on a real
slice match the recorded values (tests/data/shipped_scores.json, written by
scripts/record_shipped_scores.py when the shipped model or detector is
changed on purpose: issue 9's re-layout was checked against it, issue 11's
detector v2 and issue 10's vgg7 default re-recorded it), for each forward
engine (pathguard.detector.inspection: dense passes, and the skipping
engine the service uses on the CPU).  The previous
default, bundles/fmnist-vgg-small, is held to its last recording
(tests/data/vgg_small_scores.json) the same way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pathguard.detector.data import load_dataset
from pathguard.detector.inspection import Inspector

RECORDED = Path(__file__).parent / "data" / "shipped_scores.json"
ROOT = Path(__file__).resolve().parent.parent
RECORDINGS = {"fmnist-default": RECORDED,
              "fmnist-vgg-small": Path(__file__).parent / "data" / "vgg_small_scores.json"}


def recorded_images() -> torch.Tensor:
    """The images the recording was made on (see its description)."""
    x = load_dataset("fashion-mnist", "test").images[:256]
    g = torch.Generator().manual_seed(1)
    noisy = (x[:64] + 0.3 * torch.randn(x[:64].shape, generator=g)).clamp(0, 1)
    return torch.cat([x, noisy, 1 - x[:64]])


def expected_answers(bundle: str, engine: str) -> dict:
    record = json.loads(RECORDINGS[bundle].read_text())
    # the dense engine's answers are the top-level fields; each other engine's sit under "engines"
    return record if engine == "dense" else {**record, **record["engines"][engine]}


@pytest.mark.parametrize("engine", ["sparse", "dense"])
@pytest.mark.parametrize("bundle", sorted(RECORDINGS))
def test_shipped_bundle_answers_as_recorded(bundle, engine):
    expected = expected_answers(bundle, engine)
    inspector = Inspector.load(ROOT / "bundles" / bundle, engine=engine)
    assert inspector.engine == engine
    results = inspector.inspect(recorded_images())
    assert inspector.detector.name == expected["score"]
    assert abs(inspector.detector.threshold_ - expected["threshold"]) <= 1e-6
    np.testing.assert_allclose([r.score for r in results], expected["scores"], rtol=0, atol=1e-6)
    assert [r.predicted_class for r in results] == expected["predicted"]
    assert [r.adversarial for r in results] == expected["adversarial"]
    np.testing.assert_allclose([r.layer_deviations for r in results], expected["layer_deviations"], atol=1e-6)
    assert [r.evidence["most_deviating"] for r in results] == expected["most_deviating"]
    assert 0 < sum(expected["adversarial"]) < len(results)  # the slice holds flagged and unflagged images


@pytest.mark.parametrize("bundle", sorted(RECORDINGS))
def test_the_engines_agree_to_float_tolerance(bundle):
    # The skipping engine adds up only the active channels and folds BatchNorm into the convolutions,
    # so its sums run in another order than the dense pass's: the same answers up to float32 rounding
    # (scores within 1e-4 plus 1e-4 of their size -- a noisy image's 9.66 moved by 1.5e-4 --, the same
    # classes and flags), never another model.
    dense, sparse = expected_answers(bundle, "dense"), expected_answers(bundle, "sparse")
    assert sparse["predicted"] == dense["predicted"]
    np.testing.assert_allclose(sparse["scores"], dense["scores"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sparse["layer_deviations"], dense["layer_deviations"], rtol=0, atol=1e-4)
    near = np.abs(np.asarray(dense["scores"]) - dense["threshold"]) < 1e-4 + 1e-4 * dense["threshold"]
    flips = [i for i, (a, b) in enumerate(zip(sparse["adversarial"], dense["adversarial"])) if a != b and not near[i]]
    assert flips == []
    assert sparse["scores"] != dense["scores"]  # really two engines' recordings


def test_the_skipping_engine_reads_only_the_detectors_blocks_and_answers_the_same_bits():
    path = ROOT / "bundles" / "fmnist-default"
    lean, every = Inspector.load(path, engine="sparse"), Inspector.load(path, engine="sparse")
    assert lean.blocks_read == {0}  # fusion-moments reads the first block's moments only
    every.blocks_read = True
    images = recorded_images()[::8]
    for a, b in zip(lean.inspect(images), every.inspect(images)):
        assert (a.score, a.predicted_class, a.confidence, a.layer_deviations, a.evidence) == \
               (b.score, b.predicted_class, b.confidence, b.layer_deviations, b.evidence)
