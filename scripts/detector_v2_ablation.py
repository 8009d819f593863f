"""Detector v2's channels, one by one and combined, on the validation split.

The ablation behind the fusions of detector/provenance.py (docs/method.md,
"Detector v2"): every channel of one ``channels`` detector is fitted on
the bundle's clean training part (true labels), and scored on ``--n``
correctly classified images of the validation part's ablation pool (the
split ``pathguard fit`` attacks; never the test split) and on their
adversarial examples (``--attacks``, the presets of attacks/presets.py,
seed 0).  Each channel model depends on its own layer only and every
channel shares the same fit and reference rows, so a combination of
channels is computed exactly from the per-channel p-values: Fisher
(-2 sum log p) and min-p (-log min p), as a ``channels`` detector with
those channels alone would score them (scripts/channel_validation.py,
shared with scripts/fusion_validation_check.py).

Printed and written (``--output``, JSON): AUROC per attack (successful
examples against their clean originals) of every channel, of every pair
and triple of the strongest channels, and of the registered detectors'
channel sets, sorted by the mean over FGSM, PGD and CW (the rule of
``pathguard fit``).

    python scripts/detector_v2_ablation.py [--bundle bundles/fmnist-default] [--n 400]
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from pathguard.detector.detectors import make_detector
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.paths import observe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channel_validation import combine, fit_on_validation, write_json  # noqa: E402

RULE_ATTACKS = ("fgsm", "pgd", "cw")
REGISTERED = ("class-evidence", "provenance", "path-knn", "fusion", "fusion-path", "fusion-moments", "fusion-evidence",
              "fusion-fisher")


def all_channels(n_blocks: int, n_gated: int) -> tuple[str, ...]:
    blocks = [f"block{i}" for i in range(n_blocks)]
    gates = [f"gates{i}" for i in range(n_gated)]
    moments = [f"{kind}{i}" for kind in ("spread", "moments") for i in range(n_blocks)]
    return (*(f"value:{b}" for b in blocks + moments + gates), *(f"evidence:{b}" for b in blocks + gates),
            *(f"agreement:{a}+{b}" for a, b in zip(blocks, blocks[1:])),
            *(f"agreement:{a}+{b}" for a, b in zip(gates, gates[1:])),
            "knn:" + "+".join(blocks), "confidence", "path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/fmnist-default")
    parser.add_argument("--n", type=int, default=400, help="correctly classified validation images attacked")
    parser.add_argument("--attacks", nargs="+", default=["fgsm", "pgd", "cw", "bim", "deepfool", "pgd-low"])
    parser.add_argument("--top", type=int, default=6, help="strongest channels whose pairs and triples are tried")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    started = time.time()
    fitted = fit_on_validation(args.bundle, None, args.n, args.seed, model_channels=all_channels)
    bundle, model, pool, channels = fitted.bundle, fitted.bundle.decoupled, fitted.pool, fitted.detector.channels_
    print(f"fitted {len(channels)} channels in {time.time() - started:.0f} s")
    clean = fitted.log_p(pool.images)
    attacked = fitted.attacked(args.attacks)

    def aurocs(columns: list[int], rule: str) -> dict:
        neg = combine(clean[:, columns], rule)
        out = {a: detection_metrics(neg[ok], combine(pos[:, columns], rule))["auroc"]
               for a, (ok, pos) in attacked.items()}
        out["rule_mean"] = float(np.mean([out[a] for a in RULE_ATTACKS if a in out]))
        return out

    index = {c: i for i, c in enumerate(channels)}
    rows = {c: {"channels": [c], "combine": "-", **aurocs([i], "fisher")} for c, i in index.items()}
    strongest = sorted(channels, key=lambda c: -rows[c]["rule_mean"])[:args.top]
    best_per_attack = {a: max(channels, key=lambda c: rows[c][a]) for a in args.attacks}
    candidates = set(strongest) | set(best_per_attack.values())
    for size in (2, 3):
        for subset in combinations(sorted(candidates), size):
            for rule in ("fisher", "min-p"):
                rows[f"{rule}({', '.join(subset)})"] = {"channels": list(subset), "combine": rule,
                                                         **aurocs([index[c] for c in subset], rule)}
    one_image = observe(model, pool.images[:1], blocks=True)  # the model's layout, for the default channels
    for name in REGISTERED:  # the registered detectors' channel sets on this model
        probe = make_detector(name)
        spec = probe.default_channels(one_image)
        if all(c in index for c in spec):
            rows[f"registered {name}"] = {"channels": list(spec), "combine": probe.combine,
                                          **aurocs([index[c] for c in spec], probe.combine)}
    ordered = sorted(rows.items(), key=lambda kv: -kv[1]["rule_mean"])
    width = max(len(k) for k in rows)
    print(f"\nAUROC on validation attacks ({len(pool)} images), sorted by the mean over {', '.join(RULE_ATTACKS)}")
    print(f"{'':{width}s} " + " ".join(f"{a:>9s}" for a in [*args.attacks, "rule_mean"]))
    for name, row in ordered:
        print(f"{name:{width}s} " + " ".join(f"{row[a]:9.4f}" for a in [*args.attacks, "rule_mean"]))
    result = {"bundle": str(bundle.path), "digest": bundle.digest, "validation_images": len(pool),
              "successes": {a: int(ok.sum()) for a, (ok, _) in attacked.items()}, "seed": args.seed,
              "rule": f"mean AUROC over {list(RULE_ATTACKS)}", "best_single_channel_per_attack": best_per_attack,
              "rows": dict(ordered), "wall_seconds": time.time() - started}
    write_json(args.output, result)


if __name__ == "__main__":
    main()
