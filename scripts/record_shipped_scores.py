"""Record what a shipped bundle answers on a fixed real slice
(tests/data/shipped_scores.json for bundles/fmnist-default,
tests/data/vgg_small_scores.json for bundles/fmnist-vgg-small), for
tests/test_shipped_scores.py.

Run it only when the shipped model or detector, or a forward engine, is
changed on purpose (and say so in the commit); a refactoring must leave the
recording passing.  The dense engine's answers are the recording's top-level
fields; each other engine (``--engine sparse``) is recorded beside them under
``engines``, and recording one engine leaves the others as they were.

    python scripts/record_shipped_scores.py --engine dense --note "detector v2 (fusion), issue 11"
    python scripts/record_shipped_scores.py --bundle bundles/fmnist-vgg-small --engine sparse --note "..."
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pathguard.detector.inspection import Inspector  # noqa: E402
from test_shipped_scores import RECORDINGS, recorded_images  # noqa: E402


def answers(inspector: Inspector) -> dict:
    results = inspector.inspect(recorded_images())
    return {
        "predicted": [r.predicted_class for r in results],
        "scores": [r.score for r in results],
        "adversarial": [r.adversarial for r in results],
        "layer_deviations": [r.layer_deviations for r in results],
        "most_deviating": [r.evidence["most_deviating"] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "bundles" / "fmnist-default"),
                        help=f"one of the recorded bundles: {', '.join(sorted(RECORDINGS))}")
    parser.add_argument("--engine", choices=("dense", "sparse"), required=True)
    parser.add_argument("--note", required=True, help="why the recording changes")
    args = parser.parse_args()
    name = Path(args.bundle).name
    if name not in RECORDINGS:
        parser.error(f"no recording for {name}: one of {', '.join(sorted(RECORDINGS))}")
    path = RECORDINGS[name]
    # one torch thread, as the tests run (tests/conftest.py) and as each of the service's inference
    # workers runs on two cores: the skipping engine's one-image convolutions pick another algorithm
    # for another thread count (scores ~1e-5 apart between one and two threads; dense passes ~1e-10)
    torch.set_num_threads(1)
    inspector = Inspector.load(args.bundle, engine=args.engine)
    record = json.loads(path.read_text()) if path.exists() else {}
    if args.engine == "dense":
        engines = record.get("engines", {})
        record = {
            "description": (f"shipped bundle ({name}) on the first 256 Fashion-MNIST test images, then "
                            "Gaussian-noise copies (std 0.3, generator seed 1, clamped) and inverted copies of the "
                            f"first 64; recorded by scripts/record_shipped_scores.py: {args.note}"),
            "bundle_digest": inspector.bundle.digest,
            "threshold": inspector.detector.threshold_,
            "score": inspector.detector.name,
            **answers(inspector),
        }
        if engines:
            record["engines"] = engines
    else:
        # (not the digest: a bundle's manifest changes with its card or name, its answers do not)
        same = record.get("score") == inspector.detector.name and abs(
            record["threshold"] - inspector.detector.threshold_) <= 1e-6
        if not same:
            parser.error(f"{path} was recorded with another detector: record the dense engine first")
        record.setdefault("engines", {})[args.engine] = {"note": args.note, **answers(inspector)}
    path.write_text(json.dumps(record) + "\n")
    print(f"{len(recorded_images())} answers of {record['score']} ({args.engine} engine) written to {path}")


if __name__ == "__main__":
    main()
