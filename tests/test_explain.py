"""`pathguard explain` (detector/explain.py): the statistics on hand-made
paths and on-frequencies, then the figures and JSON of a tiny real bundle on
real Fashion-MNIST test images, through the function and through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathguard.detector.bundle import load_bundle, write_bundle
from pathguard.detector.data import FASHION_MNIST_CLASSES, DatasetError
from pathguard.cli import build_parser, config_from_args
from pathguard.detector.interpret import (
    class_on_frequency,
    effective_path_similarity,
    pairwise_class_jaccard,
    specific_filters,
    specificity,
)
from pathguard.detector.paths import layer_jaccard
from pathguard.jobs.explain import Config, explain, run
from pathguard.detector.models import ConvNet
from pathguard.detector.paths import extract_paths

torch.set_num_threads(1)

N_IMAGES = 60
IMAGE_INDEX = 7
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_FILES = {
    "class_path_maps_json", "class_path_maps_png", "class_similarity_json", "class_similarity_png",
    "specific_filters_json", "specific_filters_png", "image_path_json", "image_path_png", "summary_json",
}


# ------------------------------------------------------ hand-made numbers

# 4 classes, layers of 2 and 3 gates; class 3 has no images (NaN row).
ON_FREQ = np.array([
    [1.0, 0.0, 0.9, 0.5, 0.1],
    [0.0, 0.0, 0.1, 0.5, 0.9],
    [0.5, 1.0, 0.5, 0.5, 0.5],
    [np.nan] * 5,
])
WIDTHS = [2, 3]


def test_specificity_is_class_minus_mean_of_other_present_classes():
    spec = specificity(ON_FREQ)
    expected = np.array([
        [0.75, -0.5, 0.6, 0.0, -0.6],   # others: mean of classes 1 and 2
        [-0.75, -0.5, -0.6, 0.0, 0.6],  # others: mean of classes 0 and 2
        [0.0, 1.0, 0.0, 0.0, 0.0],      # others: mean of classes 0 and 1
    ])
    np.testing.assert_allclose(spec[:3], expected, atol=1e-12)
    assert np.isnan(spec[3]).all()
    # with a single class present there is nothing to compare with
    assert np.isnan(specificity(ON_FREQ[[0, 3]])).all()


def test_specific_filters_on_hand_made_on_frequency():
    table = specific_filters(ON_FREQ, WIDTHS, k=2)
    assert len(table) == 4 and all(len(per_class) == 2 for per_class in table)
    pick = lambda c, l: [(e["filter"], e["gate"], e["specificity"]) for e in table[c][l]]  # noqa: E731
    assert pick(0, 0) == [(0, 0, pytest.approx(0.75)), (1, 1, pytest.approx(-0.5))]
    assert pick(0, 1) == [(0, 2, pytest.approx(0.6)), (1, 3, pytest.approx(0.0))]
    assert pick(1, 1) == [(2, 4, pytest.approx(0.6)), (1, 3, pytest.approx(0.0))]
    assert pick(2, 0) == [(1, 1, pytest.approx(1.0)), (0, 0, pytest.approx(0.0))]
    assert pick(2, 1) == [(0, 2, pytest.approx(0.0)), (1, 3, pytest.approx(0.0))]  # ties: lower index first
    assert table[3] == [[], []]  # class without images
    first = table[1][1][0]
    assert first["on_frequency"] == pytest.approx(0.9) and first["others_mean"] == pytest.approx(0.3)
    # k larger than a layer: the whole layer, best first
    wide = specific_filters(ON_FREQ, WIDTHS, k=5)
    assert [len(layer) for layer in wide[0]] == [2, 3]
    assert [e["filter"] for e in wide[0][1]] == [0, 1, 2]
    with pytest.raises(ValueError):
        specific_filters(ON_FREQ, WIDTHS, k=0)


def test_on_frequency_and_class_similarities_on_hand_made_paths():
    paths = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.float32)
    pred = torch.tensor([0, 0, 1])
    freq, counts = class_on_frequency(paths, pred, 3)
    assert counts.tolist() == [2, 1, 0]
    np.testing.assert_allclose(freq[:2], [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert np.isnan(freq[2]).all()

    eff = effective_path_similarity(freq)  # class paths [1,0,0,0] and [0,0,1,1]
    np.testing.assert_allclose(eff[:2, :2], [[1.0, 0.0], [0.0, 1.0]])
    assert np.isnan(eff[2]).all() and np.isnan(eff[:, 2]).all()
    per_layer = effective_path_similarity(freq, [1, 3])
    assert len(per_layer) == 2 and per_layer[0][0, 1] == 0.0

    pair = pairwise_class_jaccard(paths, pred, 3, chunk=2)  # chunking must not matter
    assert pair[0, 0] == pytest.approx(0.5)  # J([1,1,0,0], [1,0,0,0]); self-pairs excluded
    assert pair[0, 1] == pytest.approx(0.0) and pair[1, 0] == pytest.approx(0.0)
    assert np.isnan(pair[1, 1])  # one image: no pair
    assert np.isnan(pair[2]).all()

    jac = layer_jaccard(np.array([[1, 0, 1, 0, 0]]), np.array([1, 1, 1, 0, 0]), [2, 3])
    np.testing.assert_allclose(jac, [[0.5, 1.0]])
    assert layer_jaccard(np.zeros((1, 2)), np.zeros(2), [2])[0, 0] == 1.0  # empty vs empty


# ------------------------------------------------------------ tiny bundle


def _tiny_decoupled(arch, images, labels, seed=0) -> ConvNet:
    """A tiny decoupled net whose paths and predictions vary across real
    images: BatchNorm statistics from the images, random ACM weights with
    biases centred on the images' mean pre-activations (so most gates are on
    for part of them), and a least-squares head on the features."""
    torch.manual_seed(seed)
    model = ConvNet(arch, gated=True)
    with torch.no_grad():
        for block in model.blocks:
            block.bn.momentum = None  # cumulative average: one pass sets the statistics
        model.gate_noise = 0.0
        model.train()
        model(images)
        model.eval()
        for block in model.blocks:
            control = block.control
            if control is None:
                continue
            torch.nn.init.normal_(control.fc1.weight, 0.0, 1.0)
            torch.nn.init.normal_(control.fc2.weight, 0.0, 1.0)
            seen = {}
            hook = control.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
            model(images)
            hook.remove()
            pooled = seen["x"].mean(dim=(2, 3))
            # centre on the mean, not the median: a median would put one image's logit at exactly 0,
            # where float noise between batch sizes could flip its gate
            control.fc1.bias.copy_(-(pooled @ control.fc1.weight.T).mean(0))
            control.fc2.bias.sub_(control.fc2(torch.relu(control.fc1(pooled))).mean(0))
        features = model.trace(images).features
        design = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        target = torch.nn.functional.one_hot(labels, arch.num_classes).float()
        weights = torch.linalg.lstsq(design, target).solution
        model.head.weight.copy_(weights[:-1].T)
        model.head.bias.copy_(weights[-1])
    return model


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, fmnist_test):
    from pathguard.detector.models import Architecture

    arch = Architecture("tiny", 1, 28, 10, (4, "M", 8, 8, "M"), mean=(0.5,), std=(0.5,))
    data = fmnist_test.head(N_IMAGES)
    decoupled = _tiny_decoupled(arch, data.images, data.labels)
    path = write_bundle(tmp_path_factory.mktemp("explain") / "bundle", arch, FASHION_MNIST_CLASSES, decoupled,
                        ConvNet(arch, gated=False), training={}, card={})
    return load_bundle(path)


@pytest.fixture(scope="module")
def explained(tiny_bundle, fmnist_test, tmp_path_factory):
    data = fmnist_test.head(N_IMAGES)
    out = tmp_path_factory.mktemp("explain") / "report"
    result = explain(tiny_bundle, data.images, data.labels, data.images[IMAGE_INDEX], out,
                     image_index=IMAGE_INDEX, image_label=int(data.labels[IMAGE_INDEX]), top_k=5,
                     source={"dataset": "fashion-mnist"})
    batch = extract_paths(tiny_bundle.decoupled, data.images)
    return result, out, batch


def _load(result, key) -> dict:
    return json.loads(Path(result["files"][key]).read_text())


def test_every_file_is_written_and_non_trivial(explained):
    result, out, _ = explained
    assert set(result["files"]) == EXPECTED_FILES
    for key, name in result["files"].items():
        path = Path(name)
        assert path.is_file() and path.parent == out
        if key.endswith("_png"):
            data = path.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 10_000, key
            with Image.open(path) as image:
                assert image.width > 500 and image.height > 300, key
        else:
            assert json.loads(path.read_text())["version"] == 1
    assert Path(result["files"]["image_path_png"]).name == f"image_{IMAGE_INDEX}_path.png"
    summary = json.loads((out / "explain.json").read_text())
    assert set(summary["files"]) == EXPECTED_FILES and summary["source"] == {"dataset": "fashion-mnist"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_class_path_maps_match_the_model_paths(explained):
    result, _, batch = explained
    maps = _load(result, "class_path_maps_json")
    counts = torch.bincount(batch.predictions, minlength=10)
    assert maps["classes"] == list(FASHION_MNIST_CLASSES) and maps["class_counts"] == counts.tolist()
    assert sum(maps["class_counts"]) == N_IMAGES and (counts > 0).sum() >= 3  # the fixture spreads predictions
    assert [(layer["name"], layer["width"], layer["gate_offset"]) for layer in maps["layers"]] == [
        ("conv2", 8, 0), ("conv3", 8, 8)]
    for layer in maps["layers"]:
        rows = layer["on_frequency"]
        assert len(rows) == 10
        for c, row in enumerate(rows):
            if counts[c] == 0:
                assert row is None
                continue
            assert len(row) == layer["width"]
            expected = batch.paths[batch.predictions == c][:, layer["gate_offset"]:layer["gate_offset"] + 8].mean(0)
            np.testing.assert_allclose(row, expected.numpy(), atol=1e-6)


def _as_array(matrix) -> np.ndarray:
    return np.array([[np.nan] * len(matrix) if row is None else [np.nan if x is None else x for x in row]
                     for row in matrix], dtype=float)


def test_class_similarity_is_symmetric_with_unit_diagonal(explained):
    result, _, batch = explained
    sim = _load(result, "class_similarity_json")
    present = np.array(sim["class_counts"]) > 0
    eff = _as_array(sim["effective_path_jaccard"])
    assert eff.shape == (10, 10)
    np.testing.assert_allclose(eff, eff.T, equal_nan=True)
    np.testing.assert_allclose(np.diag(eff)[present], 1.0)
    assert np.isnan(eff[~present]).all() and not np.isnan(eff[np.ix_(present, present)]).any()
    assert np.nanmin(eff) >= 0.0 and np.nanmax(eff) <= 1.0
    assert len(sim["effective_path_jaccard_per_layer"]) == 2

    pair = _as_array(sim["mean_pairwise_path_jaccard"])
    assert pair.shape == (10, 10) and sim["pairwise_images"] == N_IMAGES
    np.testing.assert_allclose(pair, pair.T, atol=1e-9, equal_nan=True)
    a, b = np.flatnonzero(present)[:2]
    pa, pb = batch.paths[batch.predictions == a], batch.paths[batch.predictions == b]
    inter = pa @ pb.T
    union = pa.sum(1, keepdim=True) + pb.sum(1) - inter
    expected = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)).mean()
    assert pair[a, b] == pytest.approx(float(expected), abs=1e-6)


def test_specific_filters_json(explained):
    result, _, _ = explained
    spec = _load(result, "specific_filters_json")
    assert spec["k"] == 5
    for name, count in zip(spec["classes"], spec["class_counts"]):
        per_layer = spec["top_filters"][name]
        assert set(per_layer) == {"conv2", "conv3"}
        for entries in per_layer.values():
            if count == 0:
                assert entries == []
                continue
            assert len(entries) == 5
            values = [e["specificity"] for e in entries]
            assert values == sorted(values, reverse=True)
            for e in entries:
                assert e["specificity"] == pytest.approx(e["on_frequency"] - e["others_mean"], abs=1e-5)
                assert 0 <= e["filter"] < 8


def test_image_path_json(explained, fmnist_test):
    result, _, batch = explained
    rec = _load(result, "image_path_json")
    assert rec["image_index"] == IMAGE_INDEX and rec["label"] == int(fmnist_test.labels[IMAGE_INDEX])
    assert rec["predicted"] == int(batch.predictions[IMAGE_INDEX])  # the image is among the chosen ones
    assert rec["predicted_name"] == FASHION_MNIST_CLASSES[rec["predicted"]]
    assert rec["class_images"] > 0 and len(rec["layers"]) == 2
    deviations = []
    for layer, offset in zip(rec["layers"], (0, 8)):
        bits = np.array(layer["bits"], dtype=bool)
        ref = np.array(layer["class_effective_path"], dtype=bool)
        assert bits.tolist() == batch.paths[IMAGE_INDEX, offset:offset + 8].bool().tolist()
        assert len(layer["class_on_frequency"]) == 8
        union = (bits | ref).sum()
        jac = (bits & ref).sum() / union if union else 1.0
        assert layer["deviation"] == pytest.approx(1.0 - jac, abs=1e-6)
        assert sorted(layer["extra_filters"] + layer["missing_filters"]) == np.flatnonzero(bits != ref).tolist()
        deviations.append(layer["deviation"])
    if max(deviations) > 0:
        assert rec["most_deviating_layers"][0] == ("conv2", "conv3")[int(np.argmax(deviations))]
    else:
        assert rec["most_deviating_layers"] == []
    assert 0.0 <= rec["overall_deviation"] <= 1.0 and not math.isnan(rec["confidence"])


def test_cli_run_via_argparse(tiny_bundle, tmp_path, capsys):
    parser = build_parser()
    defaults = config_from_args(Config, parser.parse_args(["explain"]))
    assert (defaults.dataset, defaults.split, defaults.n, defaults.image_index, defaults.output, defaults.top_k) == (
        None, "test", 2000, 0, "reports/explain", 5)
    with pytest.raises(ValueError, match="n: must be >= 1"):
        run(config_from_args(Config, parser.parse_args(["explain", "--n", "0"])))

    out = tmp_path / "cli"
    args = config_from_args(Config, parser.parse_args(["explain", "--bundle", str(tiny_bundle.path), "--n", "40",
                                                       "--image-index", "123", "--top-k", "3", "--output", str(out)]))
    result = run(args)
    printed = capsys.readouterr().out
    assert "image 123" in printed and "image_123_path.png" in printed
    assert set(result["files"]) == EXPECTED_FILES
    summary = json.loads((out / "explain.json").read_text())
    assert summary["source"]["bundle_digest"] == tiny_bundle.digest
    assert (summary["source"]["n"], summary["source"]["split"], summary["top_k"]) == (40, "test", 3)
    assert sum(json.loads((out / "class_path_maps.json").read_text())["class_counts"]) == 40
    spec = json.loads((out / "specific_filters.json").read_text())
    assert all(len(v) in (0, 3) for per_class in spec["top_filters"].values() for v in per_class.values())

    args.image_index = 10_000  # the test split has 10,000 images
    with pytest.raises(DatasetError, match="outside"):
        run(args)


def test_image_of_a_class_without_chosen_images(tiny_bundle, fmnist_test, tmp_path):
    """The explained image's predicted class may have no image in the chosen
    set: no class path, so no deviation, but the files are still written."""
    data = fmnist_test.head(N_IMAGES)
    pred = extract_paths(tiny_bundle.decoupled, data.images).predictions
    others = data.subset(torch.nonzero(pred != pred[IMAGE_INDEX]).flatten())
    result = explain(tiny_bundle, others.images, None, data.images[IMAGE_INDEX], tmp_path, image_index=IMAGE_INDEX)
    rec = _load(result, "image_path_json")
    assert rec["class_images"] == 0 and rec["overall_deviation"] is None and rec["most_deviating_layers"] == []
    assert all(layer["deviation"] is None and layer["class_on_frequency"] is None for layer in rec["layers"])
    assert rec["label"] is None and result["summary"]["accuracy"] is None
    assert Path(result["files"]["image_path_png"]).stat().st_size > 10_000


def test_image_record_carries_the_detectors_evidence(fmnist_test, tmp_path):
    """On the shipped bundle: the image figure's JSON says what /detect
    says of the image (score, flag, most deviating check, the class each
    gated layer's path points to)."""
    from pathguard.detector.inspection import Inspector

    bundle = load_bundle()
    data = fmnist_test.head(200)
    result = explain(bundle, data.images, data.labels, data.images[IMAGE_INDEX], tmp_path,
                     image_index=IMAGE_INDEX, top_k=3, source={"dataset": "fashion-mnist"})
    verdict = _load(result, "image_path_json")["detector"]
    answer = Inspector.load().inspect(data.images[IMAGE_INDEX:IMAGE_INDEX + 1])[0]
    assert verdict["score"] == pytest.approx(answer.score, abs=1e-9)
    assert verdict["adversarial"] == answer.adversarial and verdict["threshold"] == answer.threshold
    assert verdict["most_deviating"] == answer.evidence["most_deviating"]
    assert verdict["layer_classes"] == answer.evidence["layer_classes"]
    assert len(verdict["layer_classes"]) == len(bundle.decoupled.gated_widths)
    assert verdict["early_class"] == verdict["layer_classes"][0] and verdict["early_class"] in FASHION_MNIST_CLASSES
