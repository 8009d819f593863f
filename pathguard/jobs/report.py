"""Writing an evaluation report: report.json, report.md and one ROC plot
per attack (atomically, like every artifact), and the headline figures the
model card keeps."""

from __future__ import annotations

import io
from pathlib import Path

from pathguard.detector.artifacts import atomic_write_bytes, atomic_write_json


def card_summary(report: dict) -> dict:
    """The headline figures of a report, small enough for the model card."""
    return {
        "images": report["clean"]["evaluation_images"],
        "seed": report["seed"],
        "detector_score": report["detector"]["score"],
        "threshold_fpr_on_all_test_images": report["clean"]["threshold_fpr_on_all_test_images"],
        "attacks": {
            name: {"success_rate": rec["attack"]["success_rate"],
                   "auroc": {d: m["auroc"] for d, m in rec.get("detectors", {}).items()},
                   "flag_rate_at_threshold": rec.get("path_threshold", {}).get("adversarial_flag_rate")}
            for name, rec in report["attacks"].items()
        },
        "supervised_trained_on": report["config"]["supervised_attacks"],
        "natural_flag_rates": {k: v["flag_rate"] for k, v in report.get("natural", {}).get("groups", {}).items()},
        "wall_seconds": report["wall_seconds"],
    }


def markdown_table(report: dict) -> str:
    unsupervised, supervised = report["detectors"]["unsupervised"], report["detectors"]["supervised"]
    names = unsupervised + supervised
    lines = [
        f"Detector score `{report['detector']['score']}`, threshold {report['detector']['threshold']:.4g} "
        f"(target FPR {report['detector']['target_fpr']:.0%}); {report['clean']['evaluation_images']} evaluation "
        f"images; threshold FPR on all {report['clean']['all_test_images']} clean test images: "
        f"{report['clean']['threshold_fpr_on_all_test_images']:.3f}.",
        "",
        f"AUROC (unsupervised: {', '.join(unsupervised)} | supervised: {', '.join(supervised)}; "
        "* = attack seen by the supervised detectors in training)",
        "",
        "| attack | success | mean L2 | mean Linf | " + " | ".join(names)
        + " | path TPR@5% | flagged (threshold) | noise flagged |",
        "|---" * (4 + len(names) + 3) + "|",
    ]
    for name, rec in report["attacks"].items():
        a, d = rec["attack"], rec.get("detectors", {})
        if not d:
            lines.append(f"| {name} | {a['success_rate']:.3f} |" + " - |" * (2 + len(names) + 3))
            continue
        star = "*" if rec["seen_by_supervised"] else ""
        t = rec["path_threshold"]
        aurocs = " | ".join(f"{d[k]['auroc']:.4f}" for k in names)
        lines.append(
            f"| {name}{star} | {a['success_rate']:.3f} | {a['mean_l2']:.3f} | {a['mean_linf']:.3f} | {aurocs} "
            f"| {d['path']['tpr_at_5fpr']:.3f} | {t['adversarial_flag_rate']:.3f} | {t['noise_flag_rate']:.3f} |")
    lines += natural_table(report)
    reused = report.get("attack_sets_reused") or {}
    note = (f"; {len(reused)} attack set(s) reused from --attacks-from {report['config']['attacks_from']}, "
            "their generation not included" if reused else "")
    lines += ["", f"Wall time: {report['wall_seconds']:.0f} s ({report['versions']['threads']} threads, "
                  f"{report['versions']['machine']}{note})."]
    return "\n".join(lines) + "\n"


def natural_table(report: dict) -> list[str]:
    """Markdown lines for the natural out-of-distribution groups (if scored)."""
    natural = report.get("natural")
    if not natural:
        return []
    names = report["detectors"]["unsupervised"] + report["detectors"]["supervised"]
    lines = ["", f"Natural out-of-distribution images (from the evaluation images, seed {natural['seed']}): "
                 f"share flagged at the stored threshold ({natural['flag_rate_all']:.3f} over all groups; "
                 f"clean evaluation images: {natural['clean_flag_rate']:.3f}{_wrong_answer(natural)}), share "
                 "given the source image's class, share flagged among the images whose class changed and "
                 "among those whose class stayed, and AUROC against the clean evaluation images.", "",
             "| group | images | flagged | same class | flagged, class changed | flagged, class stayed | "
             + " | ".join(names) + " |",
             "|---" * (6 + len(names)) + "|"]
    for name, rec in natural["groups"].items():
        split = " | ".join(_rate(rec.get(k)) for k in ("same_class_rate", "flag_rate_class_changed",
                                                         "flag_rate_same_class"))
        aurocs = " | ".join(f"{rec['auroc'][d]:.4f}" for d in names)
        lines.append(f"| {name} | {rec['images']} | {rec['flag_rate']:.3f} | {split} | {aurocs} |")
    return lines


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _wrong_answer(natural: dict) -> str:
    """Reports from before the split have no wrong-answer rate."""
    rate = natural.get("flag_rate_wrong_answer")
    return "" if rate is None else (f"; images without a right answer (no source class, or the class "
                                    f"changed): {rate:.3f}")


def _roc_png(report: dict, name: str, per_detector: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    supervised = set(report["detectors"]["supervised"])
    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for det, (fpr, tpr) in per_detector.items():
        auroc = report["attacks"][name]["detectors"][det]["auroc"]
        ax.plot(fpr, tpr, label=f"{det} (AUROC {auroc:.3f})", linestyle="--" if det in supervised else "-")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (adversarial flagged)")
    ax.set_title(f"ROC: {name}, {report['attacks'][name]['attack']['successes']} successful examples")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_report(out: Path, report: dict, curves: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, per_detector in curves.items():
        atomic_write_bytes(out / f"roc_{name}.png", _roc_png(report, name, per_detector))
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", markdown_table(report).encode())
