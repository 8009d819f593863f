"""Calculation paths and path statistics (detector/paths.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathguard.detector.models import SPREAD_EPS, ConvNet
from pathguard.detector.paths import (
    active_fraction,
    class_jaccard,
    distinct_paths,
    extract_paths,
    jaccard_matrix,
    layer_jaccard,
    observe,
    path_summary,
    split_layers,
    PathBatch,
)


@pytest.fixture
def images():
    """Ten images of very different brightness and contrast, so that the
    pooled inputs of the ACMs (and hence the paths) differ between them."""
    g = torch.Generator().manual_seed(4)
    scale = torch.linspace(0.05, 1.0, 10).view(10, 1, 1, 1)
    return (torch.rand(10, 1, 28, 28, generator=g) * scale).clamp(0, 1)


@pytest.fixture
def tiny_model(tiny_arch, images):
    torch.manual_seed(0)
    model = ConvNet(tiny_arch, gated=True).eval()
    # Random ACMs, each logit centred on its median over ``images``: about
    # half the gates are on, and which ones depends on the input.
    with torch.no_grad():
        for index, block in enumerate(model.blocks[1:], start=1):
            block.control.fc1.weight.normal_(0, 3.0).abs_()  # ReLU inputs are >= 0: keep h > 0
            block.control.fc1.bias.zero_()
            block.control.fc2.weight.normal_(0, 1.0)
            block.control.fc2.bias.zero_()
            z = model.trace(images).gate_logits[index - 1]
            block.control.fc2.bias.sub_(z.median(dim=0).values + 1e-4)
    return model


def test_extract_paths_shapes_and_binary(tiny_model, images):
    batch = extract_paths(tiny_model, images)
    d = sum(tiny_model.gated_widths)
    assert d == 16
    assert batch.paths.shape == (10, d)
    assert batch.gate_logits.shape == (10, d)
    assert batch.logits.shape == (10, 10)
    assert batch.features.shape == (10, tiny_model.feature_dim) == (10, 8)
    assert set(batch.paths.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(batch.paths, (batch.gate_logits > 0).float())
    assert torch.equal(batch.predictions, batch.logits.argmax(1))
    assert not batch.paths.requires_grad


def test_extract_paths_equals_eval_trace(tiny_model, images):
    tiny_model.train()
    batch = extract_paths(tiny_model, images, batch_size=3)  # 4 uneven batches
    assert tiny_model.training  # mode restored
    tiny_model.eval()
    with torch.no_grad():
        trace = tiny_model.trace(images)
    assert torch.equal(batch.paths, trace.path)
    assert torch.allclose(batch.gate_logits, trace.path_logits, atol=1e-6)
    assert torch.allclose(batch.logits, trace.logits, atol=1e-5)
    assert torch.allclose(batch.features, trace.features, atol=1e-6)
    # the path layout is the gated layers, input to output, concatenated
    layers = split_layers(batch.paths, tiny_model.gated_widths)
    assert [t.shape[1] for t in layers] == [8, 8]
    assert torch.equal(layers[0], trace.gates[0]) and torch.equal(layers[1], trace.gates[1])


def test_paths_vary_with_input(tiny_model, images):
    assert distinct_paths(extract_paths(tiny_model, images).paths) > 1


def test_extract_paths_needs_gated_model(tiny_arch, images):
    with pytest.raises(ValueError):
        extract_paths(ConvNet(tiny_arch, gated=False), images)


def test_jaccard_matrix_hand_example():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    b = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    expected = torch.tensor([
        [1 / 2, 0.0, 2 / 4],
        [0.0, 1.0, 0.0],  # two empty sets count as identical
        [1 / 3, 0.0, 3 / 4],
    ])
    got = jaccard_matrix(a, b)
    assert got.shape == (3, 3)
    assert torch.allclose(got, expected)
    assert torch.allclose(jaccard_matrix(b, a), expected.T)
    # self-similarity of non-empty rows is 1
    assert torch.allclose(jaccard_matrix(a, a).diagonal(), torch.ones(3))


def test_class_jaccard_constructed_example():
    paths = torch.tensor([
        [1, 1, 0, 0],  # class 0
        [1, 1, 0, 0],  # class 0
        [1, 0, 1, 0],  # class 0
        [0, 0, 1, 1],  # class 1
        [0, 0, 1, 0],  # class 1
    ], dtype=torch.float32)
    labels = torch.tensor([0, 0, 0, 1, 1])
    # within: class 0 pairs 1, 1/3, 1/3; class 1 pair 1/2 -> (5/3 + 1/2) / 4 = 13/24
    # between: only p2 overlaps class 1: J(p2,p3) = 1/3, J(p2,p4) = 1/2, the
    # other four pairs 0 -> (1/3 + 1/2) / 6 = 5/36
    expected = {"within_class": 13 / 24, "between_class": 5 / 36}
    for chunk in (1000, 2, 1):
        got = class_jaccard(paths, labels, chunk=chunk)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (chunk, key)


def test_class_jaccard_single_class_has_no_between_pairs():
    paths = torch.tensor([[1, 0], [1, 1]], dtype=torch.float32)
    got = class_jaccard(paths, torch.tensor([3, 3]))
    assert got == {"within_class": pytest.approx(0.5), "between_class": 0.0}


def test_distinct_paths():
    paths = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    assert distinct_paths(paths) == 3
    assert distinct_paths(paths[:2]) == 1
    assert distinct_paths(torch.eye(5)) == 5


def test_active_fraction_by_hand():
    paths = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.float32)
    got = active_fraction(paths, [2, 3])
    assert got["mean"] == pytest.approx(6 / 10)
    assert got["per_layer"] == pytest.approx([3 / 4, 3 / 6])


def test_path_summary_fields(tiny_model, images):
    labels = torch.arange(10)
    summary = path_summary(tiny_model, images, labels)
    batch = extract_paths(tiny_model, images)
    assert summary["images"] == 10
    assert summary["path_bits"] == 16
    assert summary["accuracy"] == pytest.approx(float((batch.predictions == labels).float().mean()))
    assert summary["distinct_paths"] == distinct_paths(batch.paths)
    assert len(summary["active_fraction"]["per_layer"]) == 2
    assert summary["active_fraction"]["mean"] == pytest.approx(float(batch.paths.mean()))
    assert set(summary["jaccard"]) == {"within_class", "between_class"}


def test_per_block_forward_gives_any_layers_activations(tiny_model, images):
    """run_block / block_activations compute exactly what the full forward
    computes, block by block, and observe keeps every block's pooled features."""
    trace = tiny_model.eval().trace(images, keep_activations=True, keep_blocks=True)
    for index in range(len(tiny_model.blocks)):
        assert torch.equal(tiny_model.block_activations(images, index), trace.activations[index])
        assert torch.equal(trace.block_features[index], trace.activations[index].mean(dim=(2, 3)))
        # the spread: population standard deviation over space, with SPREAD_EPS under the root
        a = trace.activations[index].detach().double().flatten(2).numpy()
        want = np.sqrt(a.var(axis=2) + SPREAD_EPS)
        np.testing.assert_allclose(trace.block_spreads[index].detach().double().numpy(), want, rtol=1e-4, atol=1e-6)
    h = tiny_model.normalise(images)
    for index in range(len(tiny_model.blocks)):
        step = tiny_model.run_block(index, h)
        h = step.output
    assert torch.allclose(tiny_model.head(h.mean(dim=(2, 3))), trace.logits)
    batch = observe(tiny_model, images, blocks=True, activations=True, batch_size=3)
    assert len(batch.blocks) == len(tiny_model.blocks) and len(batch) == len(images)
    assert torch.allclose(batch.blocks[0], trace.block_features[0])
    assert len(batch.spreads) == len(tiny_model.blocks) and torch.allclose(batch.spreads[1], trace.block_spreads[1])
    assert len(batch.activations) == len(tiny_model.blocks) + 2  # + features and logits


def test_layer_jaccard_per_layer_and_against_one_row():
    paths = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    reference = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    sim = layer_jaccard(paths, reference, [2, 3])
    assert torch.allclose(sim, torch.tensor([[0.5, 1.0], [0.0, 0.0]]))
    assert layer_jaccard(torch.zeros(1, 2), torch.zeros(2), [2])[0, 0] == 1.0  # empty vs empty


def test_path_batch_subset_and_concat_keep_every_field(tiny_model, images):
    batch = observe(tiny_model, images, labels=torch.arange(10), blocks=True)
    parts = [batch.subset(torch.arange(0, 4)), batch.subset(torch.arange(4, 10))]
    joined = PathBatch.concat(parts)
    for name in ("logits", "paths", "gate_logits", "features", "labels"):
        assert torch.equal(getattr(joined, name), getattr(batch, name)), name
    assert all(torch.equal(a, b) for a, b in zip(joined.blocks, batch.blocks))
    assert joined.widths == batch.widths == tiny_model.gated_widths
