"""What the validation-only experiment scripts share (scripts/channel_validation.py):
the pool's attack sets kept in a cache folder and reused only when they are
provably the run's own, and the pixel-space channels of
scripts/pixel_channels_check.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import channel_validation  # noqa: E402
from channel_validation import SHIPPED, ValidationChannels, set_name  # noqa: E402
from pixel_channels_check import PixelChannels  # noqa: E402

from pathguard.attacks.generate import METADATA_FILE  # noqa: E402
from pathguard.detector.bundle import load_bundle  # noqa: E402


def test_attack_cache_reuses_only_the_runs_own_sets(service_bundle, fmnist_test, tmp_path, monkeypatch):
    bundle = load_bundle(service_bundle)
    pool = fmnist_test.head(12)
    channels = ValidationChannels(bundle, pool, fmnist_test.head(0), detector=None, seed=0)
    made = channels.attack_set("fgsm", str(tmp_path))
    assert (tmp_path / "fgsm" / METADATA_FILE).is_file()
    assert made.source["model_digest"] == bundle.model_digest and made.source["split"] == "validation"

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached set was generated again")

    monkeypatch.setattr(channel_validation, "generate_attack_set", no_generation)
    again = channels.attack_set("fgsm", str(tmp_path))
    assert torch.equal(again.adversarial, made.adversarial) and torch.equal(again.success, made.success)

    other_pool = ValidationChannels(bundle, fmnist_test.subset(torch.arange(12, 24)), fmnist_test.head(0),
                                    detector=None, seed=0)
    with pytest.raises(ValueError, match="other original images"):
        other_pool.attack_set("fgsm", str(tmp_path))
    other_seed = ValidationChannels(bundle, pool, fmnist_test.head(0), detector=None, seed=1)
    with pytest.raises(ValueError, match="seed 0, this run's is 1"):
        other_seed.attack_set("fgsm", str(tmp_path))


def test_set_names():
    assert set_name("min-p", SHIPPED, ()) == "min-p:shipped"
    assert set_name("min-p", SHIPPED, ("cpca32",)) == "min-p:shipped+cpca32"
    assert set_name("fisher", SHIPPED[:2], ("a",)) == "fisher:value:moments0+confidence+a"
    assert set_name("min-p", (), ("cpca32",)) == "min-p:cpca32"


def test_pixel_channels_measure_distance_from_the_predicted_class(monkeypatch):
    """Two classes of 12x12 images: class 0 bright on the left half, class 1 on
    the right.  An image of class 0 is close to class 0's mean and subspace
    and far from class 1's, by each channel; residuals are never negative."""
    generator = torch.Generator().manual_seed(0)
    left = torch.zeros(1, 12, 12)
    left[:, :, :6] = 1.0
    base = torch.stack([left, left.flip(-1)])                      # (2, 1, 12, 12)
    labels = torch.arange(2).repeat(150)
    images = (base[labels] + 0.05 * torch.randn(300, 1, 12, 12, generator=generator)).clamp(0, 1)
    import pixel_channels_check

    monkeypatch.setattr(pixel_channels_check, "POOLED", ("gauss3",))
    channels = PixelChannels(images, labels, 2)
    probe = images[:1]                                              # a class-0 image
    as_own = channels(probe, torch.tensor([0]))
    as_other = channels(probe, torch.tensor([1]))
    for name in ("cpca8", "cpca32", "gauss3"):
        assert float(as_own[name][0]) < float(as_other[name][0]), name
    assert np.isclose(float(as_own["pca128"][0]), float(as_other["pca128"][0]))   # no class
    assert float(channels(probe.flip(-1).flip(-2), torch.tensor([0]))["cpca32"][0]) > float(as_own["cpca32"][0])
    # with every direction kept, nothing is left outside the span
    d = torch.randn(5, 36, dtype=torch.float64, generator=generator)
    full = torch.linalg.svd(torch.randn(40, 36, dtype=torch.float64, generator=generator),
                            full_matrices=False).Vh
    assert torch.allclose(PixelChannels.residual(d, full), torch.zeros(5, dtype=torch.float64), atol=1e-18)
    assert (PixelChannels.residual(d, full[:3]) >= 0).all()
