"""Leak-free splits and stratified samples (detector/splits.py).

Synthetic unbalanced labels, and one real slice of Fashion-MNIST's test
labels; every property is checked on the returned indices themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathguard.detector.splits import (
    REST,
    SplitError,
    SplitResult,
    class_counts,
    stratified_sample,
    stratified_split,
)

# Unbalanced on purpose: 4 classes of 50, 30, 13 and 7 items, interleaved.
COUNTS = {0: 50, 1: 30, 2: 13, 3: 7}


def unbalanced_labels(seed: int = 5) -> torch.Tensor:
    labels = np.concatenate([np.full(n, c) for c, n in COUNTS.items()])
    return torch.from_numpy(np.random.default_rng(seed).permutation(labels))


def assert_stratified(labels: torch.Tensor, index: torch.Tensor, size: int) -> None:
    """Every class holds its share of ``size`` items within one item."""
    total = len(labels)
    got = class_counts(labels, index)
    for c, n_c in class_counts(labels).items():
        target = size * n_c / total
        assert abs(got.get(c, 0) - target) < 1.0 + 1e-9, (c, got.get(c, 0), target)


def assert_partition(parts: dict, n: int) -> None:
    seen = torch.cat(list(parts.values()))
    assert len(seen) == len(set(seen.tolist())), "splits overlap"
    assert sorted(seen.tolist()) == list(range(n)), "splits do not cover every item"


SIZES = {"calibration": 0.2, "selection": 25, "baselines": 10, "evaluation": 0.3}


def test_split_sizes_disjoint_stratified_sorted():
    labels = unbalanced_labels()
    parts = stratified_split(labels, SIZES, seed=0)
    assert isinstance(parts, SplitResult)
    assert list(parts) == ["calibration", "selection", "baselines", "evaluation", REST]
    assert [len(parts[k]) for k in parts] == [20, 25, 10, 30, 15]
    assert_partition(parts, len(labels))
    for name, size in zip(["calibration", "selection", "baselines", "evaluation"], [20, 25, 10, 30]):
        index = parts[name]
        assert index.dtype == torch.long
        assert torch.equal(index, torch.sort(index).values)
        assert_stratified(labels, index, size)


def test_split_deterministic_and_seed_dependent():
    labels = unbalanced_labels()
    a = stratified_split(labels, SIZES, seed=11)
    b = stratified_split(labels.numpy(), SIZES, seed=11)  # numpy labels give the same result
    c = stratified_split(labels, SIZES, seed=12)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[name], c[name]) for name in a)
    assert set(a["evaluation"].tolist()) != set(c["evaluation"].tolist())


def test_split_too_large_names_split_asked_and_available():
    labels = unbalanced_labels()
    with pytest.raises(SplitError) as excinfo:
        stratified_split(labels, {"calibration": 60, "evaluation": 50}, seed=0)
    message = str(excinfo.value)
    assert "'evaluation'" in message and "50" in message and "40" in message
    assert "shrink=True" in message
    assert isinstance(excinfo.value, ValueError)
    with pytest.raises(SplitError, match="'selection' asks for 101 items but only 100"):
        stratified_split(labels, {"selection": 101}, seed=0)


def test_split_shrink_scales_proportionally_and_says_so():
    labels = unbalanced_labels()
    parts = stratified_split(labels, {"calibration": 120, "evaluation": 80}, seed=0, shrink=True)
    assert len(parts["calibration"]) == 60 and len(parts["evaluation"]) == 40
    assert len(parts[REST]) == 0
    assert_partition(parts, len(labels))
    assert any("shrank" in note and "calibration 120->60" in note and "evaluation 80->40" in note
               for note in parts.notes)
    assert_stratified(labels, parts["calibration"], 60)


def test_split_fraction_rounding_to_nothing_is_an_error():
    with pytest.raises(SplitError, match="'test'.*0 items"):
        stratified_split(torch.tensor([0, 1, 0, 1]), {"test": 0.1}, seed=0)


def test_split_notes_class_missing_from_a_split():
    labels = torch.tensor([0] * 20 + [1])
    parts = stratified_split(labels, {"calibration": 5}, seed=0)
    assert any("'calibration'" in note and "[1]" in note for note in parts.notes)


@pytest.mark.parametrize("sizes", [{"rest": 3}, {"a": -1}, {"a": True}, {"a": 1.5}, {"a": 0.0}, {"a": "10"}])
def test_split_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError):
        stratified_split(unbalanced_labels(), sizes, seed=0)


def test_split_remainder_name_and_zero_count():
    labels = unbalanced_labels()
    parts = stratified_split(labels, {"test": 0.25, "unused": 0}, seed=3, rest="train")
    assert list(parts) == ["test", "unused", "train"]
    assert len(parts["test"]) == 25 and len(parts["unused"]) == 0 and len(parts["train"]) == 75
    assert_stratified(labels, parts["train"], 75)


def test_split_real_fashion_mnist_slice(fmnist_test):
    labels = fmnist_test.labels[:3000]  # the published order: not balanced per slice
    parts = stratified_split(labels, {"calibration": 0.1, "selection": 500, "evaluation": 1000}, seed=0)
    assert_partition(parts, 3000)
    assert [len(parts[k]) for k in ("calibration", "selection", "evaluation")] == [300, 500, 1000]
    for name, size in (("calibration", 300), ("selection", 500), ("evaluation", 1000)):
        assert_stratified(labels, parts[name], size)


# ------------------------------------------------------------ sample


def test_sample_round_robin_balanced_every_prefix():
    labels = unbalanced_labels()
    index = stratified_sample(labels, 28, seed=0)
    assert len(index) == 28 and len(set(index.tolist())) == 28
    counts = class_counts(labels, index)
    assert counts == {0: 7, 1: 7, 2: 7, 3: 7}
    for prefix in range(1, 29):  # round robin: every prefix is balanced within one
        values = list(class_counts(labels, index[:prefix]).values())
        assert max(values) - min(values + [0] * (4 - len(values))) <= 1


def test_sample_exhausted_class_leaves_others_to_fill():
    labels = unbalanced_labels()
    counts = class_counts(labels, stratified_sample(labels, 60, seed=1))
    assert counts[3] == 7 and counts[2] == 13  # all of the small classes
    assert counts[0] + counts[1] == 40 and abs(counts[0] - counts[1]) <= 1


def test_sample_deterministic_seeded_and_masked():
    labels = unbalanced_labels()
    mask = torch.arange(len(labels)) % 3 != 0  # e.g. "correctly classified"
    a = stratified_sample(labels, 20, seed=4, mask=mask)
    assert torch.equal(a, stratified_sample(labels, 20, seed=4, mask=mask))
    assert not torch.equal(a, stratified_sample(labels, 20, seed=5, mask=mask))
    assert bool(mask[a].all())


def test_sample_too_few_candidates_raises_or_shrinks_with_note():
    labels = unbalanced_labels()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[:12] = True
    with pytest.raises(SplitError) as excinfo:
        stratified_sample(labels, 30, seed=0, mask=mask, what="correctly classified images")
    message = str(excinfo.value)
    assert "30 correctly classified images" in message and "only 12" in message
    notes: list[str] = []
    index = stratified_sample(labels, 30, seed=0, mask=mask, shrink=True, notes=notes)
    assert sorted(index.tolist()) == list(range(12))
    assert len(notes) == 1 and "only 12" in notes[0]


def test_sample_bad_arguments():
    labels = unbalanced_labels()
    with pytest.raises(ValueError):
        stratified_sample(labels, -1, seed=0)
    with pytest.raises(ValueError, match="mask"):
        stratified_sample(labels, 3, seed=0, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one-dimensional"):
        stratified_sample(labels.view(10, 10), 3, seed=0)


def test_sample_real_fashion_mnist_not_the_first_n(fmnist_test):
    """N evaluation images from the published test set: balanced, unlike its first N."""
    labels = fmnist_test.labels
    first = class_counts(labels, torch.arange(50))
    assert max(first.values()) - min(first.values()) > 1  # the first 50 are not balanced
    index = stratified_sample(labels, 50, seed=0)
    assert set(class_counts(labels, index).values()) == {5}
