"""Profile, scores, detector API, baselines and metrics (issue: detector)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pathguard.detector.artifacts import ArtifactError
from pathguard.detector.base import NotFittedError
from pathguard.detector.baselines import Mahalanobis, MaxSoftmax, mle_lid
from pathguard.detector.bundle import load_bundle, load_detector, save_detector
from pathguard.detector.detectors import make_detector
from pathguard.detector.metrics import detection_metrics, tpr_at_fpr
from pathguard.detector.models import Architecture, ConvNet
from pathguard.detector.paths import PathBatch, extract_paths
from pathguard.detector.profile import PathProfile, ProfileMismatch
from pathguard.detector.detectors import DETECTORS, PATH_SCORES

WIDTHS = [6, 10]
D = sum(WIDTHS)


def synthetic_paths(n: int, num_classes: int = 3, seed: int = 0, flip: float = 0.05) -> PathBatch:
    """Each class has its own prototype path; images follow it with a few
    random flips, and their logits point at the class."""
    prototypes = (torch.rand(num_classes, D, generator=torch.Generator().manual_seed(1234)) < 0.5).float()
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    flips = (torch.rand(n, D, generator=gen) < flip).float()
    paths = (prototypes[labels] + flips) % 2
    gate_logits = (paths * 2 - 1) * 3 + 0.3 * torch.randn(n, D, generator=gen)
    logits = torch.full((n, num_classes), -2.0)
    logits[torch.arange(n), labels] = 4.0
    logits += 0.1 * torch.randn(n, num_classes, generator=gen)
    return PathBatch(logits, paths, gate_logits, torch.randn(n, 4, generator=gen), WIDTHS)


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    scores = np.concatenate([neg, pos])
    labels = np.concatenate([np.zeros(300), np.ones(200)])
    m = detection_metrics(neg, pos)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["aupr"] == pytest.approx(average_precision_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    assert m["tpr_at_5fpr"] == pytest.approx(tpr[fpr <= 0.05].max())
    # Hand case: perfectly separated scores give TPR 1 at any FPR.
    assert tpr_at_fpr([0, 1, 2], [5, 6]) == 1.0
    with pytest.raises(ValueError):
        detection_metrics([], [1.0])
    with pytest.raises(ValueError):
        detection_metrics([np.nan], [1.0])


# The scores that read the path alone (the channel scores that read every
# block's features are checked on moved blocks in tests/test_provenance.py).
PATH_ONLY = [name for name in PATH_SCORES if "blocks" not in DETECTORS[name].requires]


def test_path_only_scores_include_the_first_ones_and_class_evidence():
    assert {"bernoulli", "logit-gauss-max", "class-evidence"} <= set(PATH_ONLY)


@pytest.mark.parametrize("score", PATH_ONLY)
def test_moved_path_scores_higher(score):
    clean = synthetic_paths(600)
    det = make_detector(score).fit(clean).calibrate(synthetic_paths(300, seed=1))
    probe = synthetic_paths(30, seed=2)
    moved = PathBatch(probe.logits, 1 - probe.paths, -probe.gate_logits, probe.features, WIDTHS)
    original_scores = det.score_samples(probe)
    moved_scores = det.score_samples(moved)
    assert (moved_scores > original_scores).all()
    assert det.predict(moved).all()
    # About target_fpr of held-out clean paths are flagged.
    assert det.predict(synthetic_paths(1000, seed=3)).mean() < 0.15


def test_profile_counts_and_frequencies_are_per_predicted_class():
    batch = synthetic_paths(90, flip=0.0)
    profile = PathProfile.fit(batch, smoothing=1.0)
    assert profile.counts.tolist() == [30.0, 30.0, 30.0]
    # A gate always on in a class: (30 + 1) / (30 + 2).
    expected = (batch.paths[:3] * 30 + 1) / 32
    assert torch.allclose(profile.on_freq, expected)
    assert torch.equal(profile.class_paths, batch.paths[:3])


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("nope")
    with pytest.raises(ValueError, match="target_fpr"):
        make_detector("jaccard", target_fpr=1.5).fit(synthetic_paths(30))
    with pytest.raises(ValueError, match="smoothing"):
        make_detector("bernoulli", smoothing=0).fit(synthetic_paths(30))
    with pytest.raises(NotFittedError, match="not fitted"):
        make_detector("jaccard").score_samples(synthetic_paths(3))


def tiny_bundle(tmp_path, layers):
    from pathguard.detector.bundle import write_bundle

    arch = Architecture("tiny", 1, 28, 10, layers, mean=(0.5,), std=(0.5,))
    torch.manual_seed(0)
    dec, plain = ConvNet(arch, True).eval(), ConvNet(arch, False).eval()
    return write_bundle(tmp_path / "b", arch, tuple(str(i) for i in range(10)), dec, plain, {}, {})


def test_profile_of_another_model_is_refused(tmp_path):
    path = tiny_bundle(tmp_path, (4, "M", 8, 8, "M"))
    bundle = load_bundle(path)
    images = torch.rand(40, 1, 28, 28)
    det = make_detector("layer-gauss-conf").fit(extract_paths(bundle.decoupled, images))
    det.calibrate(extract_paths(bundle.decoupled, images))
    save_detector(path, det, {})
    assert load_detector(load_bundle(path)).threshold_ == det.threshold_

    # A profile fitted for other layer sizes: load must fail and say why.
    other = make_detector("layer-gauss-conf").fit(synthetic_paths(60)).calibrate(synthetic_paths(60, seed=1))
    save_detector(path, other, {})
    with pytest.raises(ArtifactError, match="does not match the model.*widths"):
        load_detector(load_bundle(path))


def test_profile_rejects_paths_of_wrong_width():
    with pytest.raises(ProfileMismatch):
        PathProfile.fit(PathBatch(**{**vars(synthetic_paths(30)), "widths": [3, 3]}))


def test_mahalanobis_and_msp_baselines():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    means = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    feats = means[labels] + torch.randn(600, 2, generator=gen)
    clean = PathBatch(torch.zeros(600, 3), torch.zeros(600, 0), torch.zeros(600, 0), feats, [], labels=labels)
    maha = Mahalanobis().fit(clean)
    assert torch.allclose(maha.means_.float(), means, atol=0.25)

    def at(point):
        return PathBatch(torch.zeros(1, 3), torch.zeros(1, 0), torch.zeros(1, 0), torch.tensor([point]), [])

    assert maha.score_samples(at([20.0, 20.0]))[0] > maha.score_samples(at([5.0, 0.1]))[0] * 10
    logits = torch.tensor([[10.0, 0.0], [0.1, 0.0]])
    s = MaxSoftmax().fit(PathBatch(logits, torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 1), []))
    scores = s.score_samples(PathBatch(logits, torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 1), []))
    assert scores[1] > scores[0]  # the unsure prediction is more suspicious


def test_lid_estimate_tracks_intrinsic_dimension():
    gen = torch.Generator().manual_seed(0)
    line = torch.randn(400, 1, generator=gen) @ torch.randn(1, 20, generator=gen)  # 1-D data in 20-D
    cloud = torch.randn(400, 20, generator=gen)                                   # 20-D data
    lid_line = mle_lid(line, line, 20, exclude_self=True).median()
    lid_cloud = mle_lid(cloud, cloud, 20, exclude_self=True).median()
    assert lid_line < 2.0 < 8.0 < lid_cloud


def test_profile_missing_from_the_manifest_is_refused(tmp_path):
    path = tiny_bundle(tmp_path, (4, "M", 8, 8, "M"))
    bundle = load_bundle(path)
    images = torch.rand(40, 1, 28, 28)
    det = make_detector("jaccard").fit(extract_paths(bundle.decoupled, images))
    save_detector(path, det.calibrate(extract_paths(bundle.decoupled, images)), {})
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["profile.json"], manifest["files"]["profile.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        load_detector(load_bundle(path))
