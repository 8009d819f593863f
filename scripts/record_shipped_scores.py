"""Record what the shipped bundle answers on a fixed real slice
(tests/data/shipped_scores.json), for tests/test_shipped_scores.py.

Run it only when the shipped model or detector is changed on purpose (and
say so in the commit); a refactoring must leave the recording passing.

    python scripts/record_shipped_scores.py --note "detector v2 (fusion), issue 11"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pathguard.detector.inspection import Inspector  # noqa: E402
from test_shipped_scores import RECORDED, recorded_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--note", required=True, help="why the recording changes")
    args = parser.parse_args()
    inspector = Inspector.load()
    results = inspector.inspect(recorded_images())
    record = {
        "description": ("shipped bundle (fmnist-default) on the first 256 Fashion-MNIST test images, then "
                        "Gaussian-noise copies (std 0.3, generator seed 1, clamped) and inverted copies of the "
                        f"first 64; recorded by scripts/record_shipped_scores.py: {args.note}"),
        "bundle_digest": inspector.bundle.digest,
        "threshold": inspector.detector.threshold_,
        "score": inspector.detector.name,
        "predicted": [r.predicted_class for r in results],
        "scores": [r.score for r in results],
        "adversarial": [r.adversarial for r in results],
        "layer_deviations": [r.layer_deviations for r in results],
        "most_deviating": [r.evidence["most_deviating"] for r in results],
    }
    RECORDED.write_text(json.dumps(record) + "\n")
    print(f"{len(results)} answers of {record['score']} written to {RECORDED}")


if __name__ == "__main__":
    main()
