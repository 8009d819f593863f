"""Channel sets compared where the shipping rule looked worse: BIM's low-FPR
end and the natural out-of-distribution set, on the validation split only.

``scripts/compare_reports.py`` found issue 10's vgg7 candidate worse than
the default beyond noise on BIM's TPR at 5% FPR and on natural
out-of-distribution images, and the channel ablation
(``scripts/detector_v2_ablation.py``) found the ``path`` channel the best
single channel on that model.  This check says, before a 2-hour fit and
evaluation, whether adding it would mend those two figures.  For each
channel set (min-p or Fisher), fitted as ``pathguard fit`` fits a
``channels`` detector (every clean training image of the bundle, true
labels, the same seed), on the validation part only (never the test split):

* the threshold: the (1 - 5%) quantile of the clean calibration split's
  scores, as ``pathguard fit`` calibrates;
* ``--attacks`` (default FGSM and BIM) on ``--n`` correctly classified
  images of the ablation pool: AUROC and TPR at 5% FPR, successful examples
  against their clean originals (the report's metrics);
* the natural out-of-distribution groups (detector/natural.py) built from
  the same pool images: the share flagged at the threshold, per group and
  over all groups, and the clean pool's flag rate.

Every channel set shares one fit and one reference, so the combinations are
computed from the per-channel p-values (scripts/channel_validation.py, shared
with scripts/detector_v2_ablation.py).

    python scripts/fusion_validation_check.py --bundle bundles/fmnist-vgg7-candidate \\
        [--sets "min-p:confidence,value:block0" "min-p:confidence,path,value:block0"] [--output out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.natural import natural_ood

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channel_validation import combine, fit_on_validation, write_json  # noqa: E402

DEFAULT_SETS = ("min-p:confidence,value:block0", "min-p:confidence,path,value:block0",
                "fisher:confidence,path,value:block0", "min-p:path")
TARGET_FPR = 0.05


def parse_set(spec: str) -> tuple[str, list[str]]:
    """'min-p:confidence,path' -> ('min-p', ['confidence', 'path'])."""
    rule, _, channels = spec.partition(":")
    if rule not in ("min-p", "fisher") or not channels:
        raise SystemExit(f"--sets: {spec!r} is not RULE:CHANNEL,CHANNEL (RULE min-p or fisher)")
    return rule, channels.split(",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/fmnist-default")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="RULE:CHANNEL,CHANNEL,...")
    parser.add_argument("--n", type=int, default=1000, help="correctly classified validation images")
    parser.add_argument("--attacks", nargs="+", default=["fgsm", "bim"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    sets = {spec: parse_set(spec) for spec in args.sets}
    started = time.time()
    channels = tuple(sorted({c for _, chans in sets.values() for c in chans}))
    fitted = fit_on_validation(args.bundle, channels, args.n, args.seed)
    bundle, pool, calibration = fitted.bundle, fitted.pool, fitted.calibration
    index = {c: i for i, c in enumerate(fitted.detector.channels_)}
    print(f"fitted {channels} in {time.time() - started:.0f} s")
    calib, clean = fitted.log_p(calibration.images), fitted.log_p(pool.images)
    attacked = fitted.attacked(args.attacks)
    natural = natural_ood(pool.images, seed=args.seed)
    natural_log_p = {group: fitted.log_p(images) for group, images in natural.groups.items()}

    rows = {}
    for spec, (rule, chans) in sets.items():
        cols = [index[c] for c in chans]
        threshold = float(np.quantile(combine(calib[:, cols], rule), 1 - TARGET_FPR, method="higher"))
        neg = combine(clean[:, cols], rule)
        row = {"threshold": threshold, "clean_pool_flagged": float((neg > threshold).mean())}
        for attack, (ok, pos) in attacked.items():
            metrics = detection_metrics(neg[ok], combine(pos[:, cols], rule), TARGET_FPR)
            row[attack] = {"auroc": metrics["auroc"], "tpr_at_5fpr": metrics["tpr_at_5fpr"]}
        flagged = {g: float((combine(lp[:, cols], rule) > threshold).mean()) for g, lp in natural_log_p.items()}
        row["natural"] = {"all": float(np.mean(list(flagged.values()))), **flagged}
        rows[spec] = row
    print(f"\n{bundle.path.name}: validation only ({len(pool)} pool images, {len(calibration)} calibration images)")
    for spec, row in rows.items():
        attacks = "  ".join(f"{a} AUROC {row[a]['auroc']:.4f} TPR@5% {row[a]['tpr_at_5fpr']:.3f}"
                            for a in args.attacks)
        groups = ", ".join(f"{g} {v:.3f}" for g, v in row["natural"].items() if g != "all")
        print(f"{spec}\n  {attacks}\n  natural flagged {row['natural']['all']:.3f} ({groups}); "
              f"clean pool flagged {row['clean_pool_flagged']:.3f}")
    result = {"bundle": str(bundle.path), "digest": bundle.digest, "pool_images": len(pool),
              "calibration_images": len(calibration), "seed": args.seed, "target_fpr": TARGET_FPR,
              "successes": {a: int(ok.sum()) for a, (ok, _) in attacked.items()}, "rows": rows,
              "wall_seconds": time.time() - started}
    write_json(args.output, result)


if __name__ == "__main__":
    main()
