"""scripts/compare_reports.py and the standard errors it judges noise with."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pathguard.detector.metrics import auroc_standard_error, proportion_standard_error

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compare_reports", ROOT / "scripts" / "compare_reports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shift", [0.5, 1.5, 2.5])
def test_auroc_standard_error_matches_the_bootstrap(shift):
    # Binormal scores, the setting Hanley & McNeil's approximation is known to
    # hold well in: its error must agree with a bootstrap of the same sample.
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 400), rng.normal(shift, 1, 300)
    auroc = roc_auc_score(np.r_[np.zeros(400), np.ones(300)], np.r_[neg, pos])
    boot = []
    for _ in range(500):
        n, p = rng.choice(neg, 400), rng.choice(pos, 300)
        boot.append(roc_auc_score(np.r_[np.zeros(400), np.ones(300)], np.r_[n, p]))
    analytic = auroc_standard_error(auroc, positives=300, negatives=400)
    assert analytic == pytest.approx(np.std(boot), rel=0.2)


def test_standard_errors_shrink_with_samples_and_refuse_nonsense():
    assert auroc_standard_error(0.9, 2000, 2000) < auroc_standard_error(0.9, 200, 200)
    assert auroc_standard_error(1.0, 50, 50) == 0.0
    assert proportion_standard_error(0.5, 100) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        auroc_standard_error(1.2, 10, 10)
    with pytest.raises(ValueError):
        proportion_standard_error(0.5, 0)


def _report(auroc: float, tpr: float, fpr: float = 0.05, ood: float = 0.85) -> dict:
    detectors = {"path": {"auroc": auroc, "tpr_at_5fpr": tpr, "positives": 1900, "negatives": 1900}}
    return {
        "config": {"bundle": "bundles/x"},
        "attacks": {"pgd": {"detectors": copy.deepcopy(detectors)}, "cw": {"detectors": copy.deepcopy(detectors)}},
        "natural": {"flag_rate_all": ood, "groups": {"g": {"images": 2000}, "h": {"images": 2000}}},
        "clean": {"threshold_fpr_on_all_test_images": fpr, "all_test_images": 10000},
    }


def test_compare_reports_tells_noise_from_a_real_drop():
    module = _script()
    base = _report(0.930, 0.55)
    same = module.compare_reports(base, copy.deepcopy(base))
    assert same["no_worse"] and {r["verdict"] for r in same["rows"]} == {"within noise"}

    slightly = _report(0.926, 0.54)          # 0.004 AUROC: well inside one report's noise
    assert module.compare_reports(base, slightly)["no_worse"]

    dropped = _report(0.930, 0.55)
    dropped["attacks"]["cw"]["detectors"]["path"]["auroc"] = 0.900
    result = module.compare_reports(base, dropped)
    assert result["worse_beyond_noise"] == ["cw AUROC"]

    better = module.compare_reports(base, _report(0.97, 0.80))
    assert better["no_worse"]
    assert {r["verdict"] for r in better["rows"] if "AUROC" in r["what"] or "TPR" in r["what"]} == {"better"}


def test_more_false_positives_count_as_worse():
    module = _script()
    result = module.compare_reports(_report(0.93, 0.55, fpr=0.05), _report(0.93, 0.55, fpr=0.065))
    assert result["worse_beyond_noise"] == ["clean FPR, all test images"]


def test_main_writes_the_table_and_exits_1_when_worse(tmp_path, capsys):
    module = _script()
    base, cand = tmp_path / "base.json", tmp_path / "cand.json"
    base.write_text(json.dumps(_report(0.93, 0.55)))
    cand.write_text(json.dumps(_report(0.85, 0.30)))
    md = tmp_path / "cmp.md"
    assert module.main([str(base), str(cand), "--markdown", str(md), "--json", str(tmp_path / "cmp.json")]) == 1
    assert "| pgd AUROC | 0.930 | 0.850 |" in md.read_text()
    assert json.loads((tmp_path / "cmp.json").read_text())["no_worse"] is False
    assert module.main([str(base), str(base)]) == 0
    with pytest.raises(SystemExit):
        module.main([str(base), str(cand), "--detector", "nope"])


def test_the_adaptive_sweep_beside_the_reports_is_compared_too(tmp_path):
    module = _script()

    def sweep(rate):
        return {"settings": [{"variant": "detector-aware PGD", "eps": 0.1, "lambda": 10.0, "mimic": 0.0,
                              "images": 300, "undetected_success_rate": rate},
                             {"variant": "detector-aware PGD", "eps": 0.03, "lambda": 0.0, "mimic": 0.0,
                              "images": 300, "undetected_success_rate": 0.60}]}

    for name, rate in (("base", 0.80), ("cand", 0.95)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(_report(0.93, 0.55)))
        (tmp_path / name / "adaptive.json").write_text(json.dumps(sweep(rate)))
    out = tmp_path / "cmp.json"
    assert module.main([str(tmp_path / "base" / "report.json"), str(tmp_path / "cand" / "report.json"),
                        "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    # more undetected successes is worse; the unchanged setting is noise
    assert result["worse_beyond_noise"] == ["adaptive detector-aware PGD, eps 0.1, lambda 10: undetected success"]
    rows = {r["what"]: r for r in result["rows"]}
    assert rows["adaptive detector-aware PGD, eps 0.03, lambda 0: undetected success"]["verdict"] == "within noise"
