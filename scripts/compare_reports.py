"""Compare two `pathguard evaluate` reports attack by attack, with noise.

Issue 10 ships a new default model only when its full evaluation report is
"no worse on any attack beyond noise" than today's.  The two reports come
from different models, so their samples differ (each attacks the 2,000 test
images *its* model classifies correctly) and they cannot be paired; a report
also keeps figures, not raw scores.  So noise is judged from the figures:

- AUROC: Hanley & McNeil's standard error from the AUROC and the numbers of
  positives and negatives (``detector.metrics.auroc_standard_error``);
- TPR at 5% FPR, natural-OOD flag rate, clean false-positive rate and, where
  ``adaptive.json`` lies beside both reports, the detector-aware attacker's
  undetected success rate per setting: binomial standard errors (the
  threshold's own sampling error is left out, so these intervals are
  slightly too narrow: the verdict errs towards "worse").

A difference counts as beyond noise when it exceeds ``z`` standard errors of
the difference (independent samples: the two errors add in quadrature);
``z`` = 1.96 by default, i.e. a two-sided 95% interval per comparison.

    .venv/bin/python scripts/compare_reports.py reports/vgg-small/report.json \
        reports/vgg7-candidate/report.json --markdown reports/vgg7-candidate/comparison.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pathguard.detector.metrics import auroc_standard_error, proportion_standard_error


def _verdict(diff: float, se: float, z: float) -> str:
    if se == 0.0:
        return "same" if diff == 0 else ("better" if diff > 0 else "worse")
    if diff > z * se:
        return "better"
    if diff < -z * se:
        return "worse"
    return "within noise"


def _row(what: str, base: float, cand: float, se_base: float, se_cand: float, z: float,
         larger_is_better: bool = True) -> dict:
    diff = cand - base
    se = math.hypot(se_base, se_cand)
    verdict = _verdict(diff if larger_is_better else -diff, se, z)
    return {"what": what, "baseline": base, "candidate": cand, "difference": diff,
            "se_difference": se, "verdict": verdict}


def compare_reports(baseline: dict, candidate: dict, detector: str = "path", z: float = 1.96) -> dict:
    """Rows of (figure, baseline, candidate, difference, its standard error,
    verdict) for every attack both reports ran, the natural OOD set and the
    clean false-positive rate."""
    rows = []
    for attack in sorted(set(baseline["attacks"]) & set(candidate["attacks"])):
        b = baseline["attacks"][attack]["detectors"][detector]
        c = candidate["attacks"][attack]["detectors"][detector]
        rows.append(_row(f"{attack} AUROC", b["auroc"], c["auroc"],
                         auroc_standard_error(b["auroc"], b["positives"], b["negatives"]),
                         auroc_standard_error(c["auroc"], c["positives"], c["negatives"]), z))
        rows.append(_row(f"{attack} TPR at 5% FPR", b["tpr_at_5fpr"], c["tpr_at_5fpr"],
                         proportion_standard_error(b["tpr_at_5fpr"], b["positives"]),
                         proportion_standard_error(c["tpr_at_5fpr"], c["positives"]), z))
    if baseline.get("natural") and candidate.get("natural"):
        nb, nc = baseline["natural"], candidate["natural"]
        size_b = sum(g["images"] for g in nb["groups"].values())
        size_c = sum(g["images"] for g in nc["groups"].values())
        rows.append(_row("natural OOD flagged", nb["flag_rate_all"], nc["flag_rate_all"],
                         proportion_standard_error(nb["flag_rate_all"], size_b),
                         proportion_standard_error(nc["flag_rate_all"], size_c), z))
    fb = baseline["clean"]["threshold_fpr_on_all_test_images"]
    fc = candidate["clean"]["threshold_fpr_on_all_test_images"]
    rows.append(_row("clean FPR, all test images", fb, fc,
                     proportion_standard_error(fb, baseline["clean"]["all_test_images"]),
                     proportion_standard_error(fc, candidate["clean"]["all_test_images"]), z,
                     larger_is_better=False))
    rows += adaptive_rows(baseline.get("adaptive"), candidate.get("adaptive"), z)
    worse = [r["what"] for r in rows if r["verdict"] == "worse"]
    return {"detector": detector, "z": z, "rows": rows, "worse_beyond_noise": worse,
            "no_worse": not worse}


def adaptive_rows(baseline: dict | None, candidate: dict | None, z: float) -> list[dict]:
    """The detector-aware attacker (``adaptive.json``): undetected success rate
    per setting both sweeps ran (smaller is better; binomial errors)."""
    if not baseline or not candidate:
        return []

    def key(row):
        return row["variant"], row["eps"], row["lambda"], row["mimic"]

    theirs = {key(row): row for row in candidate["settings"]}
    rows = []
    for b in baseline["settings"]:
        c = theirs.get(key(b))
        if c is None:
            continue
        what = f"adaptive {b['variant']}, eps {b['eps']:g}, lambda {b['lambda']:g}" + (
            f", mimic {b['mimic']:g}" if b["mimic"] else "") + ": undetected success"
        rows.append(_row(what, b["undetected_success_rate"], c["undetected_success_rate"],
                         proportion_standard_error(b["undetected_success_rate"], b["images"]),
                         proportion_standard_error(c["undetected_success_rate"], c["images"]), z,
                         larger_is_better=False))
    return rows


def to_markdown(result: dict, baseline_name: str, candidate_name: str) -> str:
    lines = [f"Detector `{result['detector']}`: {candidate_name} against {baseline_name}; a difference is "
             f"beyond noise past {result['z']} standard errors of the difference.", "",
             f"| figure | {baseline_name} | {candidate_name} | difference | s.e. | verdict |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['what']} | {r['baseline']:.3f} | {r['candidate']:.3f} | {r['difference']:+.3f} | "
                     f"{r['se_difference']:.3f} | {r['verdict']} |")
    lines += ["", "No figure worse beyond noise." if result["no_worse"]
              else "Worse beyond noise: " + ", ".join(result["worse_beyond_noise"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="report.json of today's model")
    parser.add_argument("candidate", type=Path, help="report.json of the candidate")
    parser.add_argument("--detector", default="path", help="detector whose figures are compared (default: path)")
    parser.add_argument("--z", type=float, default=1.96, help="standard errors that count as beyond noise")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    baseline, candidate = (json.loads(p.read_text()) for p in (args.baseline, args.candidate))
    # the adaptive sweep (`pathguard adaptive`) writes adaptive.json beside report.json
    for path, report in ((args.baseline, baseline), (args.candidate, candidate)):
        if (path.parent / "adaptive.json").exists():
            report["adaptive"] = json.loads((path.parent / "adaptive.json").read_text())
    for name, report in (("baseline", baseline), ("candidate", candidate)):
        if args.detector not in next(iter(report["attacks"].values()))["detectors"]:
            parser.error(f"the {name} report has no detector {args.detector!r}")
    result = compare_reports(baseline, candidate, args.detector, args.z)
    text = to_markdown(result, baseline["config"]["bundle"], candidate["config"]["bundle"])
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["no_worse"] else 1


if __name__ == "__main__":
    sys.exit(main())
