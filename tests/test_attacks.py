"""Tests for the attacks package, on a tiny gated ConvNet and 8 synthetic images.

The model is briefly fitted (in inference mode) to give the 8 noise images
labels 0..7, so the attacks have real decision boundaries to cross; image 7
stays misclassified, which exercises the "original must be correct" half of
the success definition.  Everything runs on one CPU thread in a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pathguard.attacks.generate import (
    METADATA_FILE, TENSOR_KEYS, TENSORS_FILE, generate_attack_set, load_attack_set, save_attack_set,
)
from pathguard.attacks.presets import PRESETS, attack_config, make_attack, parse_override
from pathguard.detector.artifacts import ArtifactError, atomic_write_json, read_json, sha256_file
from pathguard.detector.bundle import load_bundle, write_bundle
from pathguard.detector.models import Architecture, ConvNet
from pathguard.cli import build_parser, main
from pathguard.jobs.attack import parse_overrides, resolve_attacks, select_correct

torch.set_num_threads(1)

TINY = Architecture("tiny", 1, 28, 10, (4, "M", 8, "M"), mean=(0.5,), std=(0.5,))
LINF_TOLERANCE = 1e-6  # float32 rounding of x + eps


def _fit_tiny_model(images: torch.Tensor, labels: torch.Tensor) -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet(TINY, gated=True).eval()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(8, 1, 28, 28, generator=generator)
    # The last image repeats the first under another label: the model cannot
    # get both right, so the set always has a misclassified original.
    images[7] = images[0]
    return images, torch.arange(8)


@pytest.fixture(scope="module")
def model(data) -> ConvNet:
    return _fit_tiny_model(*data)


@pytest.fixture(scope="module")
def attack_sets(model, data) -> dict:
    images, labels = data
    return {name: generate_attack_set(model, images, labels, name, seed=0, batch_size=5, progress=False)
            for name in PRESETS}


def _predict(model, images):
    with torch.no_grad():
        return model.eval()(images).argmax(dim=1)


def test_fixture_has_correct_and_incorrect_originals(model, data):
    images, labels = data
    correct = _predict(model, images) == labels
    assert correct.sum() >= 6 and not correct.all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_produces_valid_images(name, attack_sets, data):
    images, labels = data
    s = attack_sets[name]
    assert s.attack == name and s.config == attack_config(name)
    assert s.adversarial.shape == images.shape and s.adversarial.dtype == torch.float32
    assert torch.equal(s.original, images) and torch.equal(s.labels, labels)
    assert s.adversarial.min() >= 0.0 and s.adversarial.max() <= 1.0
    delta = (s.adversarial - s.original).flatten(1)
    assert torch.allclose(s.l2, delta.norm(dim=1))
    assert torch.equal(s.linf, delta.abs().amax(dim=1))
    if PRESETS[name].norm == "Linf":
        assert s.linf.max() <= s.config["eps"] + LINF_TOLERANCE
    assert s.wall_time > 0
    for key, dtype in TENSOR_KEYS.items():
        assert getattr(s, key).dtype == dtype and len(getattr(s, key)) == len(images)


@pytest.mark.parametrize("name", list(PRESETS))
def test_success_mask_matches_model_predictions(name, attack_sets, model):
    s = attack_sets[name]
    pred_orig = _predict(model, s.original)
    pred_adv = _predict(model, s.adversarial)
    assert torch.equal(s.pred_original, pred_orig)
    assert torch.equal(s.pred_adversarial, pred_adv)
    assert torch.equal(s.success, (pred_orig == s.labels) & (pred_adv != s.labels))
    assert s.n_correct == int((pred_orig == s.labels).sum())
    assert s.success_rate == s.n_success / s.n_correct


def test_attacks_actually_fool_the_model(attack_sets, model, data):
    # The protocol's full-budget attacks must succeed on this easy model;
    # a wrapper that returned the originals would fail here.
    for name in ("fgsm", "bim", "pgd", "cw", "deepfool"):
        assert attack_sets[name].n_success >= 5, name
    misclassified = _predict(model, data[0]) != data[1]
    assert misclassified.any() and not attack_sets["pgd"].success[misclassified].any()


def test_attack_leaves_model_mode_and_grads_alone(data):
    images, labels = data
    model = _fit_tiny_model(images, labels).train()
    flags = [p.requires_grad for p in model.parameters()]
    generate_attack_set(model, images[:2], labels[:2], "cw", overrides={"steps": 3}, progress=False)
    generate_attack_set(model, images[:2], labels[:2], "deepfool", overrides={"steps": 3}, progress=False)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_attack_runs_against_inference_mode(data):
    # In training mode the gates are noisy; an attack run in that mode would
    # not be reproducible.  Same seed, model handed over in train mode: same set.
    images, labels = data
    model = _fit_tiny_model(images, labels).train()
    a = generate_attack_set(model, images, labels, "fgsm", progress=False)
    b = generate_attack_set(model.eval(), images, labels, "fgsm", progress=False)
    assert torch.equal(a.adversarial, b.adversarial)


def test_save_load_round_trip(attack_sets, tmp_path):
    s = attack_sets["pgd"]
    s.indices = torch.arange(100, 108)
    s.source = {"dataset": "synthetic", "bundle_digest": "abc"}
    try:
        save_attack_set(s, tmp_path / "pgd")
        loaded = load_attack_set(tmp_path / "pgd")
    finally:
        s.indices, s.source = None, {}
    for key in TENSOR_KEYS:
        assert torch.equal(getattr(loaded, key), getattr(s, key)), key
        assert getattr(loaded, key).dtype == getattr(s, key).dtype
    assert torch.equal(loaded.indices, torch.arange(100, 108))
    assert (loaded.attack, loaded.config, loaded.seed, loaded.batch_size, loaded.wall_time) == \
        (s.attack, s.config, s.seed, s.batch_size, s.wall_time)
    assert loaded.source == {"dataset": "synthetic", "bundle_digest": "abc"}

    meta = read_json(tmp_path / "pgd" / METADATA_FILE)
    assert meta["attack"] == "pgd" and meta["norm"] == "Linf" and meta["seed"] == 0
    assert meta["config"] == {"eps": 0.1, "alpha": 0.01, "steps": 40, "random_start": True}
    assert meta["counts"] == {"n": 8, "n_correct": s.n_correct, "n_success": s.n_success}
    assert meta["success_rate"] == s.success_rate
    assert meta["mean_norms_success"]["linf"] == pytest.approx(float(s.linf[s.success].mean()))
    assert set(meta["versions"]) >= {"torch", "torchattacks"}


def test_round_trip_without_indices_and_without_successes(model, data, tmp_path):
    images, labels = data
    s = generate_attack_set(model, images, labels, "fgsm", overrides={"eps": 0.0}, progress=False)
    assert s.n_success == 0 and s.mean_norms() == {"l2": None, "linf": None}
    save_attack_set(s, tmp_path / "zero")
    loaded = load_attack_set(tmp_path / "zero")
    assert loaded.indices is None and torch.equal(loaded.adversarial, images)
    assert read_json(tmp_path / "zero" / METADATA_FILE)["mean_norms_success"] == {"l2": None, "linf": None}


def test_truncated_tensor_file_is_refused(attack_sets, tmp_path):
    path = save_attack_set(attack_sets["fgsm"], tmp_path / "set")
    tensors = path / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_attack_set(path)
    # Even with a matching digest, an unparsable file is an ArtifactError.
    meta = read_json(path / METADATA_FILE)
    meta["tensors_sha256"] = sha256_file(tensors)
    atomic_write_json(path / METADATA_FILE, meta)
    with pytest.raises(ArtifactError, match="safetensors"):
        load_attack_set(path)


def test_missing_or_corrupt_files_are_refused(attack_sets, tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_attack_set(tmp_path / "nowhere")
    path = save_attack_set(attack_sets["fgsm"], tmp_path / "set")
    (path / TENSORS_FILE).unlink()
    with pytest.raises(ArtifactError, match="not found"):
        load_attack_set(path)
    path = save_attack_set(attack_sets["fgsm"], tmp_path / "set2")
    (path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="JSON"):
        load_attack_set(path)


def test_unknown_attack_or_parameter_is_a_value_error(model, data):
    images, labels = data
    with pytest.raises(ValueError, match="choose one of .*pgd"):
        make_attack(model, "pgdd")
    with pytest.raises(ValueError, match="valid parameters: .*eps"):
        make_attack(model, "pgd", esp=0.1)
    with pytest.raises(ValueError, match="valid parameters"):
        generate_attack_set(model, images, labels, "cw", overrides={"eps": 0.1}, progress=False)
    with pytest.raises(ValueError, match="number"):
        make_attack(model, "pgd", eps="0.1")
    with pytest.raises(ValueError, match="integer"):
        make_attack(model, "pgd", steps=2.5)
    with pytest.raises(ValueError, match="non-negative"):
        make_attack(model, "fgsm", eps=-0.1)


def test_make_attack_configures_torchattacks(model):
    import torchattacks

    attack = make_attack(model, "pgd-low", steps=5)
    assert isinstance(attack, torchattacks.PGD)
    assert (attack.eps, attack.alpha, attack.steps, attack.random_start) == (0.03, 0.003, 5, True)
    assert not attack._model_training
    cw = make_attack(model, "cw")
    assert isinstance(cw, torchattacks.CW) and (cw.c, cw.kappa, cw.steps, cw.lr) == (1.0, 0.0, 100, 0.01)
    df = make_attack(model, "deepfool")
    assert isinstance(df, torchattacks.DeepFool) and (df.steps, df.overshoot) == (50, 0.02)
    assert make_attack(model, "bim").alpha == 0.01 and make_attack(model, "bim-low").alpha == 0.003


def test_same_seed_same_pgd_set(model, data):
    images, labels = data
    state = torch.get_rng_state()
    a = generate_attack_set(model, images, labels, "pgd", seed=3, progress=False, overrides={"steps": 5})
    b = generate_attack_set(model, images, labels, "pgd", seed=3, progress=False, overrides={"steps": 5})
    c = generate_attack_set(model, images, labels, "pgd", seed=4, progress=False, overrides={"steps": 5})
    for key in TENSOR_KEYS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert not torch.equal(a.adversarial, c.adversarial)  # the random start depends on the seed
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_overrides_change_the_config_and_the_attack(model, data):
    images, labels = data
    s = generate_attack_set(model, images, labels, "pgd", overrides={"eps": 0.05, "steps": 5}, progress=False)
    assert s.config == {"eps": 0.05, "alpha": 0.01, "steps": 5, "random_start": True}
    assert s.linf.max() <= 0.05 + LINF_TOLERANCE and s.linf.max() > 0.04
    assert attack_config("pgd")["eps"] == 0.1  # presets are not mutated
    with pytest.raises(TypeError):
        PRESETS["pgd"].params["eps"] = 0.2


def test_parse_override_and_cli_overrides():
    assert parse_override("pgd", "eps", "0.05") == 0.05
    assert parse_override("pgd", "steps", "7") == 7
    assert parse_override("pgd", "random_start", "false") is False
    with pytest.raises(ValueError):
        parse_override("pgd", "steps", "seven")
    attacks = resolve_attacks(["all"])
    assert attacks == list(PRESETS)
    overrides = parse_overrides(["eps=0.05", "pgd.steps=5"], attacks)
    assert overrides["pgd"] == {"eps": 0.05, "steps": 5}
    assert overrides["fgsm-low"] == {"eps": 0.05}
    assert overrides["cw"] == {} and overrides["deepfool"] == {}
    with pytest.raises(ValueError, match="not among"):
        parse_overrides(["pgd.steps=5"], ["fgsm"])
    with pytest.raises(ValueError, match="no selected attack"):
        parse_overrides(["kappa=1"], ["fgsm", "pgd"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["eps"], ["fgsm"])
    # the extra presets are selected by name ('all' stays the protocol's), and take overrides
    assert resolve_attacks(["pgd", "pgd-bpda"]) == ["pgd", "pgd-bpda"]
    assert parse_overrides(["pgd-bpda.steps=3"], ["pgd-bpda"])["pgd-bpda"] == {"steps": 3}
    with pytest.raises(ValueError, match="unknown attack"):
        resolve_attacks(["pgd-bdpa"])


def test_select_correct_draws_correctly_classified_images_seeded(model, data):
    images, labels = data
    correct = (_predict(model, images) == labels).nonzero().flatten()
    three = select_correct(model, images, labels, 3, seed=0)
    assert len(three) == 3 and set(three.tolist()) <= set(correct.tolist())
    assert three.tolist() == sorted(three.tolist())
    assert torch.equal(three, select_correct(model, images, labels, 3, seed=0))  # seeded
    assert {tuple(select_correct(model, images, labels, 3, seed=s).tolist()) for s in range(6)} != {tuple(three)}
    assert torch.equal(select_correct(model, images, labels, 100), correct)  # all there are
    assert len(select_correct(model, images, labels, 0)) == 0


def test_cli_end_to_end(model, data, tmp_path, capsys):
    """Bundle + image folder on disk -> `run` -> loadable sets that point back at them."""
    images, labels = data
    bundle_dir = write_bundle(tmp_path / "bundle", TINY, tuple(str(i) for i in range(10)), model,
                              ConvNet(TINY, gated=False), training={}, card={})
    # A folder as a user has it: train/<class>/ names all ten classes, test/ holds the images to attack.
    root = tmp_path / "folder"
    for c in range(10):
        (root / "train" / str(c)).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 25 * c, dtype=np.uint8)).save(root / "train" / str(c) / "x.png")
    for i, (image, label) in enumerate(zip(images, labels)):
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)
        (root / "test" / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "test" / str(int(label)) / f"{i}.png")

    defaults = build_parser().parse_args(["attack"])
    assert (defaults.dataset, defaults.split, defaults.n, defaults.attack) == (None, "test", 2000, ["all"])
    assert main([
        "attack", "--bundle", str(bundle_dir), "--dataset", "folder", "--data-root", str(root), "--attack", "fgsm",
        "pgd-low", "--n", "4", "--set", "eps=0.05", "--set", "pgd-low.steps=3", "--output", str(tmp_path / "out"),
        "--no-progress",
    ]) == 0
    out = capsys.readouterr().out
    assert out.count("success") == 2 and "fgsm" in out and "pgd-low" in out

    digest, model_digest = load_bundle(bundle_dir).digest, load_bundle(bundle_dir).model_digest
    for name, config in (("fgsm", {"eps": 0.05}), ("pgd-low", {"eps": 0.05, "alpha": 0.003, "steps": 3,
                                                                   "random_start": True})):
        s = load_attack_set(tmp_path / "out" / name)
        assert s.config == config and len(s) == 4
        assert torch.equal(s.pred_original, s.labels)  # only correctly classified images
        assert s.source["bundle_digest"] == digest and s.source["dataset"] == "folder"
        assert s.source["model_digest"] == model_digest  # what evaluate --attacks-from checks
        assert json.loads((tmp_path / "out" / name / METADATA_FILE).read_text())["counts"]["n"] == 4
        assert s.indices.tolist() == sorted(s.indices.tolist())
