"""Your own images, end to end: a folder of PNGs/JPEGs -> a served bundle.

A small real folder is made from Fashion-MNIST (4 classes, train/ + test/
layout, 200 training and 60 test images per class), with what a user's
folder has: mixed sizes (some saved at 32x32), some RGB (grey replicated or
lightly tinted), some JPEG.  Then the documented walk (docs/own-images.md)
runs through ``pathguard.cli.main``: train, fit, measure, evaluate, and the
service on the resulting bundle.  Nothing is mocked; every assertion is on
what the commands wrote or printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pathguard.detector.bundle import load_bundle, load_detector
from pathguard.detector.data import DataSpec, load_dataset, load_split
from pathguard.detector.inspection import Inspector
from pathguard.service.app import create_app
from pathguard.service.settings import Settings
from PIL import Image

from pathguard.cli import main

torch.set_num_threads(1)

# Fashion-MNIST label -> folder name (no '/' in these four).
CLASSES = {1: "Trouser", 7: "Sneaker", 8: "Bag", 9: "Ankle boot"}
FOLDER_CLASSES = sorted(CLASSES.values())  # the loader's class order: sorted folder names
PER_CLASS = {"train": 200, "test": 60}
TINT = np.array([1.0, 0.93, 0.85])  # a light warm tint of an RGB copy


def _variant(k: int) -> dict:
    """How the k-th image of a class folder is saved."""
    return {"big": k % 7 == 3,            # saved at 32x32 (resized up with Pillow)
            "rgb": k % 5 == 1,            # saved as RGB ...
            "tint": k % 10 == 6,          # ... lightly tinted (k % 10 == 6 implies k % 5 == 1)
            "jpeg": k % 6 == 5}


def _save(pixels: np.ndarray, path: Path, variant: dict) -> None:
    img = Image.fromarray(pixels, "L")
    if variant["big"]:
        img = img.resize((32, 32), Image.Resampling.BILINEAR)
    if variant["rgb"]:
        grey = np.asarray(img, dtype=np.float64)[:, :, None]
        rgb = grey * (TINT if variant["tint"] else np.ones(3))
        img = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
    if variant["jpeg"]:
        img.save(path, "JPEG", quality=95)
    else:
        img.save(path, "PNG")


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``pathguard`` ARGV in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """ROOT/train/<class>/ and ROOT/test/<class>/ from real Fashion-MNIST
    images (train from its train split, test from its test split), seeded;
    returns the root and what was saved how."""
    root = tmp_path_factory.mktemp("own-images") / "photos"
    saved = {"train": [], "test": []}
    for split, n in PER_CLASS.items():
        data = load_dataset("fashion-mnist", split)
        labels = data.labels.numpy()
        rng = np.random.default_rng({"train": 11, "test": 12}[split])
        for label, name in CLASSES.items():
            (root / split / name).mkdir(parents=True)
            picks = np.sort(rng.choice(np.flatnonzero(labels == label), n, replace=False))
            for k, i in enumerate(picks):
                variant = _variant(k)
                path = root / split / name / f"{i:05d}.{'jpg' if variant['jpeg'] else 'png'}"
                _save((data.images[i, 0].numpy() * 255).round().astype(np.uint8), path, variant)
                saved[split].append({"path": path, "class": name, **variant})
    return {"root": root, "saved": saved}


def _count(folder: dict, split: str, key: str) -> int:
    return sum(1 for f in folder["saved"][split] if f[key])


@pytest.fixture(scope="module")
def walk(folder, tmp_path_factory) -> dict:
    """train -> fit -> measure on the folder, as a user runs them (1 + 1
    epochs; --val-fraction 0.5 so that fit's calibration split has over 250
    correctly classified images)."""
    work = tmp_path_factory.mktemp("walk")
    bundle = work / "my-bundle"
    root = str(folder["root"])
    # the quick CPU recipe the README gives for a first run (the default vgg7 needs more epochs than
    # this walk's one + one to classify the 250 calibration images fit asks for)
    train = ["train", "--dataset", "folder", "--data-root", root, "--image-size", "28", "--channels", "1",
             "--architecture", "vgg-small", "--distill-weight", "0", "--val-fraction", "0.5",
             "--epochs-plain", "1", "--epochs-decoupled", "1", "--batch-size", "32",
             "--output", str(bundle), "--no-progress"]
    steps = {"train": _run(train)}
    assert steps["train"][0] == 0, steps["train"]
    steps["fit"] = _run(["fit", "--bundle", str(bundle), "--n-ablation", "30", "--ablation-attacks", "fgsm", "pgd",
                         "--no-progress"])
    assert steps["fit"][0] == 0, steps["fit"]
    steps["measure"] = _run(["measure", "--bundle", str(bundle)])
    assert steps["measure"][0] == 0, steps["measure"]
    return {"bundle": bundle, "work": work, "train_argv": train, "steps": steps, **folder}


EVALUATE = ["--quick", "--quick-n", "20", "--attacks", "fgsm", "pgd", "--no-progress", "--no-update-card"]


@pytest.fixture(scope="module")
def evaluation(walk) -> dict:
    """A quick evaluation of the bundle on its own data (the path-supervised
    baseline only: see test_evaluate_quick_with_the_default_detectors)."""
    report = walk["work"] / "report"
    code, out, err = _run(["evaluate", "--bundle", str(walk["bundle"]), "--output", str(report),
                           "--supervised", "path-supervised", *EVALUATE])
    assert code == 0, (out, err)
    return _json(report / "report.json")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------ train

def test_bundle_records_the_folder_it_was_trained_on(walk):
    data = _json(walk["bundle"] / "data.json")
    spec = data["spec"]
    assert spec["dataset"] == "folder"
    assert Path(spec["root"]) == walk["root"]
    assert spec["layout"] == "train-test"
    assert spec["classes"] == FOLDER_CLASSES
    assert spec["shape"] == [1, 28, 28] and spec["channels"] == 1 and spec["image_size"] == 28
    assert spec["resize"] == "pad" and spec["fingerprint"]
    n_train = len(walk["saved"]["train"])
    assert data["split"]["train"] + data["split"]["validation"] == n_train
    assert data["split"]["validation"] == round(0.5 * n_train) and data["split"]["test"] == len(walk["saved"]["test"])
    bundle = load_bundle(walk["bundle"])
    assert bundle.classes == tuple(FOLDER_CLASSES) and bundle.input_shape == (1, 28, 28)
    assert bundle.data_spec == DataSpec.from_json(spec)


def test_normalisation_comes_from_the_training_part(walk):
    data = _json(walk["bundle"] / "data.json")
    norm = data["normalisation"]
    assert norm["computed_on"] == "the train part"
    # recompute it from the train part of the folder, split as the bundle records
    from pathguard.detector.data import normalisation_stats, train_val_split

    full = load_split(DataSpec.from_json(data["spec"]), "train")
    train_idx, _ = train_val_split(len(full), data["split"]["val_fraction"], data["split"]["seed"])
    mean, std = normalisation_stats(full.subset(train_idx))
    assert norm["mean"] == pytest.approx(list(mean), rel=1e-6)
    assert norm["std"] == pytest.approx(list(std), rel=1e-6)
    arch = load_bundle(walk["bundle"]).arch
    assert list(arch.mean) == pytest.approx(norm["mean"]) and list(arch.std) == pytest.approx(norm["std"])
    assert abs(arch.mean[0] - 0.2860) > 1e-3  # not Fashion-MNIST's constants


def test_train_says_what_it_converted(walk):
    out = walk["steps"]["train"][1]
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    for split in ("train", "test"):
        resized, rgb = _count(walk, split, "big"), _count(walk, split, "rgb")
        assert resized and rgb
        assert any(f"resized {resized} image(s) to 28x28 (pad:" in n for n in notes), (split, notes)
        assert any(f"converted {rgb} colour image(s) to grey" in n for n in notes), (split, notes)
    # and the bundle keeps the notes
    recorded = _json(walk["bundle"] / "data.json")["notes"]
    assert any(f"resized {_count(walk, 'train', 'big')} image(s)" in n for n in recorded)
    assert "bundle written to" in out


def test_train_refuses_to_overwrite_without_force(walk, capsys):
    before = (walk["bundle"] / "manifest.json").read_bytes()
    code = main(walk["train_argv"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pathguard train: error:" in err and "exists" in err and "--force" in err
    assert (walk["bundle"] / "manifest.json").read_bytes() == before


def test_a_relative_data_root_still_works_from_another_directory(walk, tmp_path, monkeypatch):
    """`--data-root photos` is how users type it: the bundle must find the
    folder again when a later command runs elsewhere."""
    monkeypatch.chdir(walk["root"].parent)
    bundle = tmp_path / "relative-bundle"
    code, out, err = _run(["train", "--dataset", "folder", "--data-root", walk["root"].name, "--image-size", "28",
                           "--channels", "1", "--architecture", "vgg-small", "--val-fraction", "0.5",
                           "--limit-train", "64", "--limit-test", "16",
                           "--epochs-plain", "0", "--epochs-decoupled", "1", "--output", str(bundle),
                           "--no-progress"])
    assert code == 0, (out, err)
    monkeypatch.chdir(tmp_path)  # elsewhere: no "photos" here
    code, out, err = _run(["measure", "--bundle", str(bundle)])
    assert code == 0, f"data.json records root {_json(bundle / 'data.json')['spec']['root']!r}: {err}"
    assert json.loads(out[out.index("{"):])["images"] == len(walk["saved"]["test"])


# -------------------------------------------------------------------- fit

def test_fit_reads_the_bundles_folder_by_default(walk):
    profile = _json(walk["bundle"] / "profile.json")
    n_test = len(walk["saved"]["test"])
    assert profile["fitted_on"]["data"]["dataset"] == "folder"
    assert Path(profile["fitted_on"]["data"]["root"]) == walk["root"]
    check = profile["threshold_check"]
    assert check["test_images"] == n_test
    assert 0.0 <= check["fpr_all"] <= 1.0 and check["target_fpr"] == 0.05
    split = _json(walk["bundle"] / "data.json")["split"]
    assert profile["fitted_on"]["clean_train_images"] == split["train"]
    # ablation pool + calibration split = the validation part, disjoint
    assert profile["calibration"]["clean_validation_images"] >= 250
    assert profile["ablation"]["validation_images"] <= 30
    assert profile["ablation"]["attacks"] == ["fgsm", "pgd"]
    assert sorted(int(c) for c in profile["calibration"]["per_class"]) == [0, 1, 2, 3]
    # the default threshold holds the FPR at or below 5% with 95% confidence (detector/calibration.py)
    cal = profile["calibration"]
    assert cal["rule"] == "clopper-pearson upper bound" and cal["confidence"] == 0.95
    assert cal["calibration_fpr"] < cal["fpr_upper_bound"] <= 0.05
    assert cal["scores_above"] == round(cal["calibration_fpr"] * cal["clean_validation_images"])
    out = walk["steps"]["fit"][1]
    assert f"FPR there {cal['calibration_fpr']:.4f}, upper 0.95-bound {cal['fpr_upper_bound']:.4f}" in out
    assert f"threshold check on the {n_test} clean test images: FPR {check['fpr_all']:.4f}" in out
    assert f"note: folder at {walk['root']} (train): resized {_count(walk, 'train', 'big')} image(s)" in out
    assert "instead of the bundle's" not in out  # no other data was named
    card = _json(walk["bundle"] / "model_card.json")
    assert card["detector"]["threshold_check"] == check


def test_fit_refuses_data_with_other_classes(walk, capsys):
    before = (walk["bundle"] / "profile.json").read_bytes()
    code = main(["fit", "--bundle", str(walk["bundle"]), "--dataset", "fashion-mnist", "--n-ablation", "30",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pathguard fit: error:" in err and "classes" in err
    assert "T-shirt/top" in err and "Ankle boot" in err  # names both class lists
    assert (walk["bundle"] / "profile.json").read_bytes() == before


def test_fit_refuses_a_training_folder_that_changed(walk, tmp_path, capsys):
    """One image added to train/ after training: the train/validation cut is
    a seeded permutation of the training files, so it no longer matches the
    recorded one and the calibration split would hold images the network
    was trained on.  fit must refuse (as the one-folder layout already is),
    not go on with a note."""
    bundle = shutil.copytree(walk["bundle"], tmp_path / "bundle")
    source = next(f["path"] for f in walk["saved"]["train"] if f["class"] == "Bag" and not f["jpeg"])
    extra = walk["root"] / "train" / "Bag" / "added-later.png"
    shutil.copy(source, extra)
    try:
        code = main(["fit", "--bundle", str(bundle), "--n-ablation", "30", "--ablation-attacks", "fgsm",
                     "--no-progress"])
    finally:
        extra.unlink()
    captured = capsys.readouterr()
    assert code == 2, "fit went on: " + next((line for line in captured.out.splitlines() if "differ" in line), "")
    assert "image files changed since the bundle was trained" in captured.err


def test_fit_a_channel_score_the_user_names(walk, tmp_path):
    """--score channels --channels ...: the named channels, min-p combined,
    are fitted, calibrated and stored; the bundle's card names the score."""
    from pathguard.detector.provenance import ChannelScore

    bundle = shutil.copytree(walk["bundle"], tmp_path / "bundle")
    assert main(["fit", "--bundle", str(bundle), "--score", "channels", "--channels", "value:moments0",
                 "confidence", "--n-ablation", "20", "--ablation-attacks", "fgsm", "--no-progress"]) == 0
    detector = load_detector(load_bundle(bundle))
    assert isinstance(detector, ChannelScore) and detector.name == "channels"
    assert detector.channels_ == ("value:moments0", "confidence") and detector.combine == "min-p"
    profile = _json(bundle / "profile.json")
    assert profile["ablation"]["chosen"] == "channels"
    assert profile["fit_config"]["channels"] == ["value:moments0", "confidence"]
    assert _json(bundle / "model_card.json")["detector"]["score"] == "channels"
    # the stored threshold holds 5% FPR on the calibration split: a few percent of clean test images flagged
    assert 0.0 < profile["threshold_check"]["fpr_all"] < 0.2


def test_fit_calibrate_only_sets_another_operating_point(walk, tmp_path, capsys):
    """--calibrate-only keeps the fitted detector and sets its threshold on
    the same calibration split: with fit's options it gives fit's threshold
    back; with another target FPR and the plain quantile, another threshold,
    the previous one recorded."""
    bundle = shutil.copytree(walk["bundle"], tmp_path / "bundle")
    fitted = _json(bundle / "profile.json")
    tensors = (bundle / "profile.safetensors").read_bytes()
    assert main(["fit", "--bundle", str(bundle), "--calibrate-only", "--no-progress"]) == 0
    same = _json(bundle / "profile.json")
    assert same["threshold"] == fitted["threshold"]
    assert same["calibration"] == fitted["calibration"] and same["threshold_check"] == fitted["threshold_check"]
    assert same["ablation"] == fitted["ablation"] and same["fit_config"] == fitted["fit_config"]
    capsys.readouterr()

    assert main(["fit", "--bundle", str(bundle), "--calibrate-only", "--target-fpr", "0.2", "--fpr-confidence", "0",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    profile = _json(bundle / "profile.json")
    assert (bundle / "profile.safetensors").read_bytes() == tensors  # the fitted detector, untouched
    assert profile["params"]["target_fpr"] == 0.2 and profile["threshold"] < fitted["threshold"]
    cal = profile["calibration"]
    assert cal["rule"] == "quantile"
    assert cal["clean_validation_images"] == fitted["calibration"]["clean_validation_images"]
    assert 0.15 < cal["calibration_fpr"] <= 0.2
    assert profile["recalibrated"]["previous"]["threshold"] == fitted["threshold"]
    assert f"threshold was {fitted['threshold']:.6g} (target FPR 0.05)" in out
    detector = load_detector(load_bundle(bundle))  # verifies the manifest
    assert detector.threshold_ == profile["threshold"] and detector.target_fpr == 0.2
    card = _json(bundle / "model_card.json")["detector"]
    assert card["threshold"] == profile["threshold"] and card["threshold_check"] == profile["threshold_check"]


def test_fit_calibrate_only_on_a_folder_of_own_images(walk, tmp_path, capsys):
    """--calibration-images sets the fitted detector's threshold on the
    clean images under a folder (searched recursively, no labels, mixed
    sizes and formats converted as the training data was): the plain
    quantile of their scores, recomputed here from the folder loaded by the
    labelled loader; a folder with too few images is refused, nothing
    written."""
    bundle = shutil.copytree(walk["bundle"], tmp_path / "bundle")
    tensors = (bundle / "profile.safetensors").read_bytes()
    own = walk["root"] / "train"  # 800 images in class folders: the labels are not read
    assert main(["fit", "--bundle", str(bundle), "--calibrate-only", "--calibration-images", str(own),
                 "--target-fpr", "0.1", "--fpr-confidence", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    profile = _json(bundle / "profile.json")
    assert (bundle / "profile.safetensors").read_bytes() == tensors  # the fitted detector, untouched
    cal = profile["calibration"]
    assert cal["clean_images"] == 4 * PER_CLASS["train"] and cal["source"]["folder"] == str(own)
    assert "per_class" not in cal and cal["rule"] == "quantile"
    assert any(note.startswith(f"resized {_count(walk, 'train', 'big')} image(s) to 28x28")
               for note in cal["source"]["notes"])
    assert f"calibrated on {4 * PER_CLASS['train']} clean images of {own}" in out
    detector = load_detector(load_bundle(bundle))
    same = load_split(DataSpec("folder", str(walk["root"]), image_size=28, channels=1), "train")
    scores = detector.score_samples(detector.observe(load_bundle(bundle).decoupled, same.images))
    assert detector.threshold_ == pytest.approx(float(np.quantile(scores, 0.9, method="higher")), rel=1e-5)
    assert cal["calibration_fpr"] == pytest.approx(float((scores > detector.threshold_).mean()), abs=1e-9)
    previous = _json(walk["bundle"] / "profile.json")["threshold"]
    assert profile["recalibrated"]["previous"]["threshold"] == previous
    flagged = float((scores > previous).mean())  # how unlike the fit's clean images these are
    assert cal["source"]["flagged_at_previous_threshold"] == pytest.approx(flagged, abs=1e-9)
    assert ("warning: the previous threshold" in out) == (flagged > 2 * 0.05)
    # negatives of the same items (light background): unlike anything the detector was fitted on
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for path in sorted(own.rglob("*.png"))[:260]:
        with Image.open(path) as img:
            Image.fromarray(255 - np.asarray(img.convert("L"))).save(negatives / path.name)
    unlike = shutil.copytree(walk["bundle"], tmp_path / "unlike")
    assert main(["fit", "--bundle", str(unlike), "--calibrate-only", "--calibration-images", str(negatives),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    source = _json(unlike / "profile.json")["calibration"]["source"]
    assert source["flagged_at_previous_threshold"] > 0.1
    assert f"warning: the previous threshold ({previous:.6g}) flagged " in out

    before = (bundle / "profile.json").read_bytes()
    few = walk["root"] / "test"  # 240 images
    assert main(["fit", "--bundle", str(bundle), "--calibrate-only", "--calibration-images", str(few),
                 "--no-progress"]) == 2
    assert f"{4 * PER_CLASS['test']} images under {few}, at least 250 are needed" in capsys.readouterr().err
    assert (bundle / "profile.json").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--calibration-images", "photos"], "--calibration-images sets the threshold of a fitted detector: add "
                                         "--calibrate-only"),
    (["--score", "channels"], "--score channels needs --channels"),
    (["--score", "fusion-path", "--channels", "confidence"], "--channels is for --score channels"),
    (["--score", "channels", "--channels", "confidance"], "channel 'confidance': kind must be one of"),
    (["--fpr-confidence", "1"], "fpr-confidence: must be in [0, 1), got 1.0"),
    (["--target-fpr", "1.5"], "target-fpr: must be in (0, 1), got 1.5"),
    (["--calibrate-only", "--score", "auto"], "--calibrate-only keeps the bundle's fitted detector"),
    # a 0.1% FPR bounded at 95% confidence needs 2,995 calibration images; this folder has a few hundred
    (["--target-fpr", "0.001"], "calibration images cannot bound a 0.001 false-positive rate at 0.95 confidence: "
                                "at least 2995 are needed"),
])
def test_fit_refuses_options_that_do_not_fit(walk, args, message, capsys):
    before = (walk["bundle"] / "profile.json").read_bytes()
    code = main(["fit", "--bundle", str(walk["bundle"]), *args, "--n-ablation", "20", "--no-progress"])
    assert code == 2 and message in capsys.readouterr().err
    assert (walk["bundle"] / "profile.json").read_bytes() == before


# ---------------------------------------------------------------- measure

def test_measure_uses_the_folders_test_split(walk):
    out = walk["steps"]["measure"][1]
    figures = json.loads(out[out.index("{"):])
    assert figures["images"] == len(walk["saved"]["test"])
    assert figures["decoupled_accuracy"] > 0.7  # 4 easy classes: well above chance (0.25)
    assert _json(walk["bundle"] / "model_card.json")["test"]["images"] == len(walk["saved"]["test"])


# --------------------------------------------------------------- evaluate

def test_evaluate_samples_are_class_balanced(walk, evaluation):
    report = evaluation
    assert report["data"]["dataset"] == "folder" and Path(report["data"]["root"]) == walk["root"]
    assert report["clean"]["all_test_images"] == len(walk["saved"]["test"])
    per_class = {int(c): n for c, n in report["samples"]["evaluation_per_class"].items()}
    assert sorted(per_class) == [0, 1, 2, 3]
    assert sum(per_class.values()) == report["samples"]["evaluation"] == 20
    assert max(per_class.values()) - min(per_class.values()) <= 1
    assert set(report["attacks"]) == {"fgsm", "pgd"}
    assert report["samples"]["supervised_training_validation_images"] == 20


def test_evaluate_quick_with_the_default_detectors(walk, capsys):
    """`evaluate --quick --quick-n 20` with the default detectors (LID among
    them) must run on a small folder: few successful attacks leave LID fewer
    clean examples than its k=20 neighbours need, and --quick shrinks its
    reference minibatch but not k."""
    report = walk["work"] / "report-default-detectors"
    code = main(["evaluate", "--bundle", str(walk["bundle"]), "--output", str(report), *EVALUATE])
    err = capsys.readouterr().err
    assert code == 0, err
    supervised = set(_json(report / "report.json")["detectors"]["supervised"])
    assert supervised == {"path-supervised", "channels-supervised", "lid"}


# ---------------------------------------------------------------- service

def _pick(walk, **want) -> dict:
    return next(f for f in walk["saved"]["test"] if all(f[k] == v for k, v in want.items()))


def test_served_bundle_answers_for_the_folders_images(walk):
    plain = _pick(walk, big=False, rgb=False, jpeg=False)        # a 28x28 grey PNG
    big_rgb = _pick(walk, big=True, rgb=True, jpeg=False)        # a 32x32 RGB PNG
    assert Image.open(big_rgb["path"]).size == (32, 32) and Image.open(big_rgb["path"]).mode == "RGB"

    with TestClient(create_app(Settings(bundle=walk["bundle"], torch_threads=1))) as client:
        model = client.get("/model")
        assert model.status_code == 200, model.text
        files = [("files", (f["path"].name, f["path"].read_bytes(), "image/png")) for f in (plain, big_rgb)]
        refused = client.post("/detect", files=files)
        assert refused.status_code == 422 and "resize" in refused.json()["detail"]
        response = client.post("/detect", files=files, params={"resize": "true"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    threshold = _json(walk["bundle"] / "profile.json")["threshold"]
    for result in results:
        assert result["label"] in FOLDER_CLASSES
        assert result["label"] == FOLDER_CLASSES[result["predicted_class"]]
        assert isinstance(result["score"], float)
        assert result["threshold"] == pytest.approx(threshold, rel=1e-12)
        assert result["adversarial"] == (result["score"] > result["threshold"])
    assert [r["resized"] for r in results] == [False, True]

    # the 28x28 PNG scores exactly as the same image read by the folder loader, offline
    pixels = torch.from_numpy(np.asarray(Image.open(plain["path"]), dtype=np.float32) / 255.0)[None, None]
    offline = Inspector.load(walk["bundle"]).inspect(pixels)[0]
    assert results[0]["label"] == offline.label
    assert results[0]["score"] == pytest.approx(offline.score, rel=1e-4, abs=1e-5)
