"""End to end on a small real slice: train -> fit -> evaluate --quick."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pathguard.detector.bundle import load_bundle, load_detector
from pathguard.detector.data import ImageSet
from pathguard.detector.detectors import PATH_SCORES
from pathguard.cli import main


@pytest.fixture(scope="module")
def fitted_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "bundle"
    # 600 validation images: enough for a calibration split of >= 250 correctly classified ones
    # vgg-small (the default is vgg7) keeps this plumbing test quick; --score auto
    # fits every registered score, which the ablation test below checks.
    assert main(["train", "--output", str(out), "--architecture", "vgg-small", "--epochs-plain", "1",
                 "--epochs-decoupled", "1",
                 "--limit-train", "3000", "--val-fraction", "0.2", "--limit-test", "200", "--no-progress"]) == 0
    # no --ablation-attacks: --score auto chooses on FGSM, PGD and CW by default
    assert main(["fit", "--bundle", str(out), "--score", "auto",
                 "--limit-train", "1200", "--n-ablation", "40",
                 "--no-progress"]) == 0
    return out


def _finite(obj):
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def test_fit_writes_profile_threshold_and_ablation(fitted_bundle):
    bundle = load_bundle(fitted_bundle)  # manifest still verifies after fit
    detector = load_detector(bundle)
    assert detector.threshold_ is not None and math.isfinite(detector.threshold_)
    profile = json.loads((fitted_bundle / "profile.json").read_text())
    assert profile["version"] == 2 and profile["detector"] == detector.name
    assert profile["ablation"]["chosen"] == detector.name
    assert set(profile["ablation"]["results"]) == set(PATH_SCORES)
    # the attacks that ran are recorded, the score-choice default resolved
    assert profile["ablation"]["attacks"] == profile["fit_config"]["ablation_attacks"] == ["fgsm", "pgd", "cw"]
    assert all(set(r["auroc"]) == {"fgsm", "pgd", "cw"} for r in profile["ablation"]["results"].values())
    assert bundle.card["detector"]["score"] == detector.name


def test_evaluate_quick_writes_every_report_file(fitted_bundle, tmp_path):
    out = tmp_path / "report"
    attacks = ["fgsm", "bim", "pgd", "cw", "deepfool", "fgsm-low", "bim-low", "pgd-low"]
    assert main(["evaluate", "--bundle", str(fitted_bundle), "--output", str(out), "--quick", "--quick-n", "40",
                 "--limit-train", "1200", "--no-progress", "--attacks", *attacks,
                 "--unsupervised", "path", "max-softmax", "energy", "mahalanobis", "mahalanobis-multi", "knn",
                 "nic"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert _finite(report)
    assert (out / "report.md").read_text().count("\n|") >= 2 + len(attacks)
    for key in ("seed", "versions", "config", "samples", "wall_seconds", "timing_seconds"):
        assert key in report
    # each attack set's own generation time, wherever it was made (jobs/attack_pool.py)
    assert report["attack_workers"] >= 1
    assert {f"attack {a}" for a in attacks} | {"attack supervised:fgsm", "attack supervised:pgd"} <= \
        set(report["timing_seconds"])
    assert report["samples"]["evaluation"] == 40
    assert set(report["attacks"]) == set(attacks)
    natural = report["natural"]
    assert {"blank-black", "blank-white", "inverted", "white-background", "gaussian-noise",
            "rotated-90"} <= set(natural["groups"])
    for rec in natural["groups"].values():
        assert rec["images"] == 40 and 0.0 <= rec["flag_rate"] <= 1.0
        assert set(rec["auroc"]) == set(report["detectors"]["unsupervised"] + report["detectors"]["supervised"])
    assert "same_class_rate" in natural["groups"]["inverted"]
    assert "same_class_rate" not in natural["groups"]["blank-grey"]
    # the split by answer adds back up to the group's flag rate, and the wrong-answer rate to the whole set's
    wrong = flagged_wrong = 0.0
    for rec in natural["groups"].values():
        if "same_class_rate" not in rec:
            wrong, flagged_wrong = wrong + rec["images"], flagged_wrong + rec["flag_rate"] * rec["images"]
            continue
        same, changed, stayed = rec["same_class_rate"], rec["flag_rate_class_changed"], rec["flag_rate_same_class"]
        parts = (same * (stayed or 0.0)) + (1 - same) * (changed or 0.0)
        assert parts == pytest.approx(rec["flag_rate"], abs=1e-9)
        wrong, flagged_wrong = wrong + (1 - same) * 40, flagged_wrong + (1 - same) * 40 * (changed or 0.0)
    assert natural["flag_rate_wrong_answer"] == pytest.approx(flagged_wrong / wrong, abs=1e-9)
    assert "flagged, class changed" in (out / "report.md").read_text()
    assert "Natural out-of-distribution" in (out / "report.md").read_text()
    with_metrics = [a for a, r in report["attacks"].items() if r["detectors"]]
    assert {"fgsm", "pgd"} <= set(with_metrics)
    for name in with_metrics:
        rec = report["attacks"][name]
        assert set(rec["detectors"]) == {"path", "max-softmax", "energy", "mahalanobis", "mahalanobis-multi", "knn",
                                         "nic", "path-supervised", "channels-supervised", "lid"}
        for metrics in rec["detectors"].values():
            assert 0.0 <= metrics["auroc"] <= 1.0
        assert (out / f"roc_{name}.png").stat().st_size > 5000
        assert 0.0 <= rec["path_threshold"]["noise_flag_rate"] <= 1.0


def test_evaluate_adaptive_quick_reports_each_setting(fitted_bundle, tmp_path):
    out = tmp_path / "adaptive"
    assert main(["adaptive", "--quick", "--n", "20", "--bundle", str(fitted_bundle),
                 "--output", str(out), "--lambdas", "0", "3", "--eps", "0.1", "--n-targets", "500"]) == 0
    report = json.loads((out / "adaptive.json").read_text())
    # the detector-aware sweep, then layer mimicking at the largest lambda (mu = 1, the default)
    assert [(r["variant"], r["eps"], r["lambda"], r["mimic"]) for r in report["settings"]] == [
        ("detector-aware PGD", 0.1, 0.0, 0.0), ("detector-aware PGD", 0.1, 3.0, 0.0),
        ("layer mimicking", 0.1, 3.0, 1.0)]
    for row in report["settings"]:
        assert 0.0 <= row["fooling_rate"] <= 1.0
        assert 0.0 <= row["undetected_success_rate"] <= row["fooling_rate"]
    assert set(report["surrogate_fidelity"]) == {"clean", "adversarial (plain PGD)", "adversarial (layer mimicking)"}
    table = (out / "adaptive.md").read_text()
    assert "| attack | eps | lambda |" in table and "| layer mimicking (mu 1.0) | 0.1 | 3.0 |" in table


REUSE_RUN = ["--quick", "--quick-n", "20", "--limit-train", "1200", "--no-progress", "--attacks", "fgsm", "pgd",
             "--unsupervised", "path", "max-softmax", "--supervised", "path-supervised", "--no-natural",
             "--no-update-card"]


def test_evaluate_reuses_the_attack_sets_it_saved(fitted_bundle, tmp_path, capsys):
    """--save-attacks writes every set (the supervised ones under
    supervised/) with the model they were made against; --attacks-from
    evaluates on exactly those sets (same figures, no generation) and refuses
    a set that is not this run's, naming why."""
    import shutil

    from pathguard.attacks.generate import load_attack_set
    from pathguard.detector.bundle import update_bundle_card

    sets, first, second = tmp_path / "sets", tmp_path / "first", tmp_path / "second"
    assert main(["evaluate", "--bundle", str(fitted_bundle), "--output", str(first), "--save-attacks", str(sets),
                 *REUSE_RUN]) == 0
    digest = load_bundle(fitted_bundle).model_digest
    for folder in ("fgsm", "pgd", "supervised/fgsm", "supervised/pgd"):
        assert load_attack_set(sets / folder).source["model_digest"] == digest
    # a copy whose card (not its model) changed: another bundle digest, the same model digest
    copy = shutil.copytree(fitted_bundle, tmp_path / "copy")
    update_bundle_card(copy, {"note": "recalibrated"})
    assert load_bundle(copy).digest != load_bundle(fitted_bundle).digest
    assert load_bundle(copy).model_digest == digest
    assert main(["evaluate", "--bundle", str(copy), "--output", str(second), "--attacks-from", str(sets),
                 *REUSE_RUN]) == 0
    a, b = (json.loads((out / "report.json").read_text()) for out in (first, second))
    assert set(b["attack_sets_reused"]) == {"test:fgsm", "test:pgd", "supervised:fgsm", "supervised:pgd"}
    assert not any(key.startswith("attack ") for key in b["timing_seconds"])  # nothing generated
    for name in ("fgsm", "pgd"):
        assert b["attacks"][name]["attack"] == a["attacks"][name]["attack"]
        assert b["attacks"][name]["detectors"] == a["attacks"][name]["detectors"]
    assert "4 attack set(s) reused from --attacks-from" in (second / "report.md").read_text()
    # the bundle's detector alone (--supervised with no names): no supervised sets needed, none starred
    alone = tmp_path / "alone"
    assert main(["evaluate", "--bundle", str(copy), "--output", str(alone), "--attacks-from", str(sets),
                 *REUSE_RUN[:REUSE_RUN.index("--unsupervised")], "--unsupervised", "path", "--supervised",
                 "--no-natural", "--no-update-card"]) == 0
    c = json.loads((alone / "report.json").read_text())
    assert (c["detectors"]["unsupervised"], c["detectors"]["supervised"]) == (["path"], [])
    assert set(c["attack_sets_reused"]) == {"test:fgsm", "test:pgd"}
    assert "supervised training" not in c["timing_seconds"]
    for name in ("fgsm", "pgd"):
        assert c["attacks"][name]["detectors"]["path"] == a["attacks"][name]["detectors"]["path"]
        assert c["attacks"][name]["seen_by_supervised"] is False
    capsys.readouterr()

    # another seed draws other images and attacks with another seed: refused, nothing written
    assert main(["evaluate", "--bundle", str(copy), "--output", str(tmp_path / "third"), "--attacks-from",
                 str(sets), "--seed", "1", *REUSE_RUN]) == 2
    err = capsys.readouterr().err
    assert "not the test:fgsm attack set of this run" in err and "seed 0, this run's is 1" in err
    assert "other original images" in err
    assert not (tmp_path / "third" / "report.json").exists()
    # a set that does not say which model it was made against is not trusted
    meta = json.loads((sets / "pgd" / "attack.json").read_text())
    meta["source"].pop("model_digest")
    (sets / "pgd" / "attack.json").write_text(json.dumps(meta))
    assert main(["evaluate", "--bundle", str(copy), "--output", str(tmp_path / "fourth"), "--attacks-from",
                 str(sets), *REUSE_RUN]) == 2
    assert "does not record the model it was made against" in capsys.readouterr().err


def test_supervised_flag_alone_means_no_supervised_detectors():
    from pathguard.cli import build_parser, config_from_args
    from pathguard.jobs import evaluate

    parser = build_parser()
    alone = config_from_args(evaluate.Config, parser.parse_args(["evaluate", "--supervised"]))
    assert alone.supervised == ()
    assert evaluate.attack_tasks(alone, ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ("a",)),
                                 None).keys() == {f"test:{a}" for a in alone.attacks}
    named = config_from_args(evaluate.Config, parser.parse_args(["evaluate", "--supervised", "lid"]))
    assert named.supervised == ("lid",)
    default = config_from_args(evaluate.Config, parser.parse_args(["evaluate"]))
    assert default.supervised == ("path-supervised", "channels-supervised", "lid")
    # other list options still need at least one value
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--attacks"])
