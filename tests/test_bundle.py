"""Bundles (detector/bundle.py) and the artifact layer under them
(detector/artifacts.py): round trip, manifest checks, refusal of tampered,
truncated, missing and mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from pathguard.detector.artifacts import (
    MANIFEST,
    ArtifactError,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from pathguard.detector.bundle import (
    ARCHITECTURE_FILE,
    CARD_FILE,
    DECOUPLED_FILE,
    PLAIN_FILE,
    TRAINING_FILE,
    load_bundle,
    update_bundle_card,
    write_bundle,
)
from pathguard.detector.models import Architecture, ConvNet

CLASSES = tuple(f"class{i}" for i in range(10))


def _models(arch, seed=0):
    torch.manual_seed(seed)
    decoupled = ConvNet(arch, gated=True)
    plain = ConvNet(arch, gated=False)
    # make every tensor (BN statistics, counters) differ from a fresh init
    with torch.no_grad():
        for model in (decoupled, plain):
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor) * 0.1)
                else:
                    tensor.add_(7)
    return decoupled.eval(), plain.eval()


@pytest.fixture
def bundle_dir(tmp_path, tiny_arch):
    decoupled, plain = _models(tiny_arch)
    path = write_bundle(
        tmp_path / "b", tiny_arch, CLASSES, decoupled, plain,
        training={"config": {"seed": 0}}, card={"test": {"decoupled_accuracy": 0.5}},
    )
    return path, decoupled, plain


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_exact(bundle_dir, tiny_arch):
    path, decoupled, plain = bundle_dir
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [ARCHITECTURE_FILE, DECOUPLED_FILE, PLAIN_FILE, TRAINING_FILE, CARD_FILE, MANIFEST]
    )
    bundle = load_bundle(path)
    assert bundle.arch == tiny_arch
    assert bundle.classes == CLASSES
    assert bundle.input_shape == (1, 28, 28)
    assert bundle.card == {"test": {"decoupled_accuracy": 0.5}}
    assert bundle.training == {"config": {"seed": 0}}
    assert bundle.decoupled.gated and not bundle.plain.gated
    assert not bundle.decoupled.training and not bundle.plain.training  # loaded in eval mode
    _assert_same_state(bundle.decoupled, decoupled)
    _assert_same_state(bundle.plain, plain)
    assert bundle.digest == sha256_file(path / MANIFEST)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(bundle.decoupled.trace(x).path, decoupled.trace(x).path)
        assert torch.equal(bundle.decoupled(x), decoupled(x))
        assert torch.equal(bundle.plain(x), plain(x))
    meta = read_json(path / ARCHITECTURE_FILE)
    assert meta["gated_widths"] == [8, 8]
    assert Architecture.from_json(meta["architecture"]) == tiny_arch


def test_manifest_lists_every_file_with_sha256(bundle_dir):
    path = bundle_dir[0]
    manifest = verify_manifest(path)
    assert manifest["algorithm"] == "sha256"
    assert set(manifest["files"]) == {ARCHITECTURE_FILE, DECOUPLED_FILE, PLAIN_FILE, TRAINING_FILE, CARD_FILE}
    for name, digest in manifest["files"].items():
        assert digest == sha256_file(path / name)


def test_no_pickle_in_weights(bundle_dir):
    """Weights are safetensors: an 8-byte header length, then a JSON header."""
    path = bundle_dir[0]
    for name in (DECOUPLED_FILE, PLAIN_FILE):
        raw = (path / name).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        assert "blocks.1.control.fc2.weight" in header or name == PLAIN_FILE
        assert not raw.startswith(b"\x80")  # pickle protocol marker
        assert not raw.startswith(b"PK")  # torch.save zip


@pytest.mark.parametrize("name", [DECOUPLED_FILE, PLAIN_FILE, ARCHITECTURE_FILE, CARD_FILE])
def test_tampered_byte_refused(bundle_dir, name):
    path = bundle_dir[0]
    target = path / name
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path)
    assert str(target) in str(excinfo.value)
    assert "mismatch" in str(excinfo.value)


@pytest.mark.parametrize("name", [DECOUPLED_FILE, PLAIN_FILE])
def test_truncated_file_refused(bundle_dir, name):
    path = bundle_dir[0]
    target = path / name
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path)
    assert str(target) in str(excinfo.value)
    # without the manifest check, the safetensors reader still refuses it
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path, verify=False)
    assert str(target) in str(excinfo.value)


@pytest.mark.parametrize("name", [DECOUPLED_FILE, PLAIN_FILE, CARD_FILE, ARCHITECTURE_FILE, TRAINING_FILE])
def test_deleted_file_refused(bundle_dir, name):
    path = bundle_dir[0]
    (path / name).unlink()
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path)
    assert str(path / name) in str(excinfo.value)
    assert "missing" in str(excinfo.value)


def test_deleted_manifest_refused(bundle_dir):
    path = bundle_dir[0]
    (path / MANIFEST).unlink()
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path)
    assert str(path / MANIFEST) in str(excinfo.value)


def test_missing_bundle_directory_refused(tmp_path):
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(excinfo.value)


def test_manifest_without_required_file_refused(bundle_dir):
    path = bundle_dir[0]
    manifest = read_json(path / MANIFEST)
    del manifest["files"][PLAIN_FILE]
    atomic_write_json(path / MANIFEST, manifest)
    with pytest.raises(ArtifactError, match=PLAIN_FILE):
        load_bundle(path)


def test_manifest_entry_escaping_directory_refused(bundle_dir):
    path = bundle_dir[0]
    manifest = read_json(path / MANIFEST)
    manifest["files"]["../outside.json"] = "0" * 64
    atomic_write_json(path / MANIFEST, manifest)
    with pytest.raises(ArtifactError, match="not a plain file name"):
        verify_manifest(path)


def test_mismatched_architecture_weights_refused(tmp_path, tiny_arch):
    """architecture.json says one net, the weights are of another."""
    other = Architecture("tiny", 1, 28, 10, (4, "M", 8, 16, "M"), mean=(0.5,), std=(0.5,))
    decoupled, plain = _models(other)
    path = write_bundle(tmp_path / "b", tiny_arch, CLASSES, decoupled, plain, training={}, card={})
    verify_manifest(path)  # the files themselves are intact...
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path)  # ...but they do not fit
    assert str(path / DECOUPLED_FILE) in str(excinfo.value)
    assert "do not fit" in str(excinfo.value)


def test_plain_weights_in_decoupled_slot_refused(tmp_path, tiny_arch):
    decoupled, plain = _models(tiny_arch)
    path = write_bundle(tmp_path / "b", tiny_arch, CLASSES, plain, plain, training={}, card={})
    with pytest.raises(ArtifactError) as excinfo:
        load_bundle(path)
    assert str(path / DECOUPLED_FILE) in str(excinfo.value)


def test_wrong_class_count_and_format_refused(bundle_dir):
    path = bundle_dir[0]
    meta = read_json(path / ARCHITECTURE_FILE)
    meta["classes"] = ["a", "b"]
    atomic_write_json(path / ARCHITECTURE_FILE, meta)
    write_manifest(path)
    with pytest.raises(ArtifactError, match="2 class names"):
        load_bundle(path)
    meta["classes"] = list(CLASSES)
    meta["format"] = 99
    atomic_write_json(path / ARCHITECTURE_FILE, meta)
    write_manifest(path)
    with pytest.raises(ArtifactError, match="unsupported bundle format"):
        load_bundle(path)


def test_rewrite_replaces_bundle_atomically(bundle_dir, tiny_arch):
    path, _, _ = bundle_dir
    decoupled, plain = _models(tiny_arch, seed=1)
    write_bundle(path, tiny_arch, CLASSES, decoupled, plain, training={}, card={"v": 2})
    bundle = load_bundle(path)
    assert bundle.card == {"v": 2}
    _assert_same_state(bundle.decoupled, decoupled)
    # no staging or retired directories left beside it
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert not any(p.name.endswith(".tmp") for p in path.iterdir())


def test_update_bundle_card_keeps_manifest_valid(bundle_dir):
    path = bundle_dir[0]
    card = update_bundle_card(path, {"detection": {"auroc": 0.9}})
    assert card["detection"] == {"auroc": 0.9} and card["test"] == {"decoupled_accuracy": 0.5}
    assert load_bundle(path).card == card


def test_model_digest_follows_the_model_not_the_detector_or_card(bundle_dir, tiny_arch):
    """Bundle.model_digest (what saved attack sets are matched by): the same
    after a card update or another detector, another for other weights."""
    path = bundle_dir[0]
    before = load_bundle(path)
    assert len(before.model_digest) == 64
    update_bundle_card(path, {"detection": {"auroc": 0.9}})
    after_card = load_bundle(path)
    assert after_card.digest != before.digest and after_card.model_digest == before.model_digest
    decoupled, plain = _models(tiny_arch, seed=1)
    write_bundle(path, tiny_arch, CLASSES, decoupled, plain, training={"config": {"seed": 0}},
                 card={"test": {"decoupled_accuracy": 0.5}})
    assert load_bundle(path).model_digest != before.model_digest
    assert load_bundle(path, verify=False).model_digest == ""  # only a verified manifest vouches for it


def test_tensors_and_json_helpers(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).T, "b": torch.tensor([1, 2], dtype=torch.int64)}
    atomic_save_tensors(tmp_path / "t.safetensors", tensors, {"epoch": "3"})
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    with pytest.raises(ArtifactError, match="file not found"):
        load_tensors(tmp_path / "absent.safetensors")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError) as excinfo:
        read_json(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(excinfo.value)
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "t.safetensors"]


def test_release_0_1_profile_loads_as_the_same_detector(bundle_dir):
    """A version-1 profile (release 0.1: the score by name, one-class tensors
    named per score) loads through the upgrade path as the registered score
    it was, giving the same scores and threshold as the version-2 file."""
    from pathguard.detector.bundle import DETECTOR_CONFIG, DETECTOR_TENSORS, load_detector, save_detector
    from pathguard.detector.detectors import make_detector
    from pathguard.detector.paths import observe

    path, decoupled, _ = bundle_dir
    g = torch.Generator().manual_seed(0)
    fit_batch, calibration, probe = (observe(decoupled, torch.rand(n, 1, 28, 28, generator=g)) for n in (200, 100, 50))
    detector = make_detector("layer-gauss-conf").fit(fit_batch)
    detector.calibrate(calibration)
    save_detector(path, detector)
    v2 = load_detector(load_bundle(path))

    config, tensors = read_json(path / DETECTOR_CONFIG), load_tensors(path / DETECTOR_TENSORS)
    assert {"one_class.location", "one_class.precision"} <= set(tensors)
    v1_tensors = {(k.replace("one_class.", "one_class.layer-gauss-conf.") if k.startswith("one_class.") else k): v
                  for k, v in tensors.items()}
    atomic_save_tensors(path / DETECTOR_TENSORS, v1_tensors)
    atomic_write_json(path / DETECTOR_CONFIG, {"version": 1, "score": "layer-gauss-conf",
                                               "target_fpr": config["params"]["target_fpr"],
                                               "smoothing": config["params"]["smoothing"],
                                               "threshold": config["threshold"]})
    write_manifest(path)
    v1 = load_detector(load_bundle(path))
    assert v1.name == "layer-gauss-conf" and v1.threshold_ == v2.threshold_
    assert torch.equal(torch.as_tensor(v1.score_samples(probe)), torch.as_tensor(v2.score_samples(probe)))
