"""The natural out-of-distribution set (detector/natural.py): every group
has the shape and range of the images it came from, is reproducible from
its seed, and is the transformation its name says."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pathguard.detector.natural import BLANKS, natural_ood, rotate, white_background

GROUPS = {"blank-black", "blank-grey", "blank-white", "inverted", "white-background", "uniform-noise",
          "gaussian-noise", "rotated-90", "rotated-180"}


def items(n: int = 40, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Light items on a black background, like Fashion-MNIST: a bright
    off-centre rectangle with a faint rim, the rest exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, channels, size, size)
    top, bottom, left, right = size // 7, 5 * size // 7, size // 5, size // 2
    x[:, :, top:bottom, left:right] = 0.05  # the faint anti-aliased rim
    inner = (slice(top + 1, bottom - 1), slice(left + 1, right - 1))
    x[:, :, inner[0], inner[1]] = 0.3 + 0.7 * torch.rand(n, channels, bottom - top - 2, right - left - 2, generator=gen)
    return x


def test_every_group_has_the_source_shape_and_pixels_in_range():
    natural = natural_ood(items(40, channels=3, size=12), seed=0, n=25)
    assert set(natural.names) == GROUPS and len(natural) == len(GROUPS)
    for name, images in natural.items():
        assert images.shape == (25, 3, 12, 12), name
        assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1, name
    assert natural.source_indices.shape == (25,) and len(set(natural.source_indices.tolist())) == 25


def test_the_same_seed_gives_the_same_set_and_another_seed_another():
    x = items(60)
    a, b, c = natural_ood(x, seed=3, n=20), natural_ood(x, seed=3, n=20), natural_ood(x, seed=4, n=20)
    for name in GROUPS:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(a.source_indices, b.source_indices)
    assert not torch.equal(a.source_indices, c.source_indices)
    assert not torch.equal(a["uniform-noise"], c["uniform-noise"])
    assert not torch.equal(a["gaussian-noise"], c["gaussian-noise"])


def test_without_n_every_image_is_used_in_order():
    x = items(7)
    natural = natural_ood(x, seed=0)
    assert natural.source_indices.tolist() == list(range(7))
    assert torch.equal(natural["inverted"], 1 - x)


def test_blanks_inversion_and_white_background_are_what_they_say():
    x = items(30)
    natural = natural_ood(x, seed=1, n=10)
    source = x[natural.source_indices]
    for name, value in BLANKS.items():
        assert torch.equal(natural[name], torch.full_like(source, value)), name
    assert torch.equal(natural["inverted"], 1 - source)
    on_white = natural["white-background"]
    background = source <= 0.1
    assert torch.equal(on_white[background], torch.ones(int(background.sum())))  # black and the faint rim -> white
    assert torch.equal(on_white[~background], source[~background])  # the item itself unchanged
    assert (on_white == 1).float().mean() > 0.8 and (source == 0).float().mean() > 0.8  # dark -> light background
    assert torch.equal(white_background(source, background_level=0.0)[source > 0], source[source > 0])


def test_noise_groups_follow_their_distributions():
    natural = natural_ood(items(8, size=64), seed=0, gaussian_mean=0.5, gaussian_std=0.5)
    uniform, gaussian = natural["uniform-noise"], natural["gaussian-noise"]
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.std() - 1 / math.sqrt(12)) < 0.01
    assert uniform.min() >= 0 and uniform.max() < 1
    below = 0.5 * (1 + math.erf(-1 / math.sqrt(2)))  # P(N(0.5, 0.5^2) <= 0) = Phi(-1), clipped to exactly 0
    assert abs((gaussian == 0).float().mean() - below) < 0.01
    assert abs((gaussian == 1).float().mean() - below) < 0.01
    assert abs(gaussian.mean() - 0.5) < 0.01


def test_rotations_turn_counter_clockwise():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 4] = 1.0  # top right
    natural = natural_ood(x, seed=0, angles=(90, 180, 270))
    assert natural["rotated-90"][0, 0, 0, 0] == 1  # top right -> top left
    assert natural["rotated-180"][0, 0, 4, 0] == 1  # -> bottom left
    assert natural["rotated-270"][0, 0, 4, 4] == 1  # -> bottom right
    source = items(6)
    assert torch.equal(natural_ood(source, angles=(180,))["rotated-180"], source.flip(2, 3))


def test_other_angles_interpolate_with_the_same_convention():
    x = items(4, channels=2, size=9)
    for degrees in (90, 180, -90):  # the interpolating path, a hair off the exact angle, matches rot90
        assert torch.allclose(rotate(x, degrees + 1e-9), rotate(x, degrees), atol=1e-5)
    size = 31
    yy, xx = torch.meshgrid(torch.arange(size) - 15.0, torch.arange(size) - 15.0, indexing="ij")
    disc = ((yy ** 2 + xx ** 2) <= 64).float()[None, None]
    turned = rotate(disc, 45)
    assert (turned - disc).abs().mean() < 0.02 and turned[0, 0, 15, 15] == 1  # a centred disc barely changes
    natural = natural_ood(items(3), angles=(30,))
    assert natural["rotated-30"].shape == (3, 1, 28, 28) and "bilinear" in natural.provenance["rotated-30"]["method"]


def test_provenance_is_json_and_bad_input_is_refused():
    natural = natural_ood(items(10), seed=2, n=4)
    record = json.loads(json.dumps(natural.to_json()))
    assert record["seed"] == 2 and set(record["groups"]) == GROUPS
    assert record["groups"]["inverted"]["from_test_images"] and not record["groups"]["blank-grey"]["from_test_images"]
    assert record["groups"]["white-background"]["background_level"] == 0.1
    with pytest.raises(ValueError, match="square"):
        natural_ood(torch.zeros(2, 1, 4, 6))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        natural_ood(2 * items(3))
    with pytest.raises(ValueError, match="n must be"):
        natural_ood(items(3), n=5)
