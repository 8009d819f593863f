"""Accuracy against executed FLOPs, by moving the gates' decision threshold.

The shipped model switches a filter on when its ACM logit z > 0.  Shifting
that threshold to z > t (t < 0: more filters on, t > 0: fewer) traces the
model's own accuracy/compute trade-off without retraining: every point is
the same weights, so the curve shows what the sparsity target buys.  Each
point: mean active gates, executed MACs / dense plain MACs, accuracy, on
the first N test images (default: all 10,000).

    .venv/bin/python bench/tradeoff_sparsity.py [--bundle B] [--n 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pathguard.detector.acceleration import flop_summary  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.detector.models import ConvNet  # noqa: E402
from pathguard.detector.paths import extract_paths  # noqa: E402
from pathguard.detector.measure import evaluate_accuracy  # noqa: E402


def shifted(model: ConvNet, offset: float) -> ConvNet:
    """A copy whose gates open at z > offset instead of z > 0."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for block in out.blocks:
            if block.control is not None:
                block.control.fc2.bias -= offset
    return out.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--offsets", type=float, nargs="+", default=[-4, -2, -1, -0.5, 0, 0.5, 1, 2, 4])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    test = load_dataset("fashion-mnist", "test").head(args.n)
    plain_acc = evaluate_accuracy(bundle.plain, test)["accuracy"]
    rows = []
    print(f"{len(test)} test images; plain net accuracy {plain_acc:.4f} (dense, 1.000 of its MACs)")
    print(f"{'offset':>7} {'active':>7} {'MACs/plain':>11} {'accuracy':>9} {'loss (pts)':>10}")
    for offset in args.offsets:
        model = shifted(bundle.decoupled, offset)
        acc = float((extract_paths(model, test.images).predictions == test.labels).float().mean())
        flops = flop_summary(model, test.images)
        active = float(extract_paths(model, test.images).paths.mean())
        row = {"offset": offset, "active_fraction": active, "macs_vs_plain": flops["ratio_vs_plain"],
               "accuracy": acc, "loss_points_vs_plain": 100 * (plain_acc - acc)}
        rows.append(row)
        print(f"{offset:7.2f} {active:7.3f} {row['macs_vs_plain']:11.3f} {acc:9.4f} {row['loss_points_vs_plain']:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain_accuracy": plain_acc, "images": len(test), "points": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
