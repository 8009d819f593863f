"""What `pathguard fit --calibrate-only --calibration-images DIR` buys a
deployment whose clean images differ from the validation split.

The shipped threshold promises 5% false positives on images like its
calibration split.  Here the served images are Fashion-MNIST test images
seen through a duller camera: contrast ``--contrast`` and the background
lifted by ``--lift`` (x' = contrast * x + lift, still in [0, 1]).  The first
half of the test split, so shifted, is written as PNG files to a folder (a
user's "clean traffic" folder); a copy of the bundle is recalibrated on it
with the real command; the flag rate of the *other* half, shifted the same
way and read back through the same loader, is measured with the shipped
threshold and with the new one, and so is the share of FGSM examples
(eps 0.1, the protocol's preset) made from ``--n-attack`` of those held-out
images that are flagged: what the new threshold costs in detection.  The
test split is used only to measure: nothing here is chosen on it.

    python scripts/shifted_calibration_check.py [--json reports/own-images/shifted-calibration.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pathguard.attacks.generate import generate_attack_set
from pathguard.cli import main as pathguard
from pathguard.detector.bundle import load_bundle, load_detector
from pathguard.detector.data import load_unlabelled_images
from pathguard.jobs.data import data_spec, load_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channel_validation import write_json  # noqa: E402


def write_pngs(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, pixels in enumerate(images):
        Image.fromarray(np.round(pixels[0] * 255).astype(np.uint8), "L").save(folder / f"{i:05d}.png")


def flag_rate(bundle_path: Path, images) -> float:
    bundle = load_bundle(bundle_path)
    detector = load_detector(bundle)
    return float(detector.predict(detector.observe(bundle.decoupled, images)).mean())


def read_back(folder: Path):
    return load_unlabelled_images(folder, 1, (28, 28))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/fmnist-default")
    parser.add_argument("--contrast", type=float, default=0.8)
    parser.add_argument("--lift", type=float, default=0.1)
    parser.add_argument("--n-attack", type=int, default=500, help="held-out images attacked with FGSM")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.time()
    bundle = load_bundle(args.bundle)
    test = load_for(bundle, data_spec(bundle), "test")
    shifted = (args.contrast * test.images + args.lift).clamp(0, 1).numpy()
    half = len(shifted) // 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_pngs(shifted[:half], work / "traffic")
        write_pngs(shifted[half:], work / "held-out")
        write_pngs(test.images[half:].numpy(), work / "held-out-unshifted")
        copy = Path(shutil.copytree(args.bundle, work / "bundle"))
        held_out, unshifted = read_back(work / "held-out"), read_back(work / "held-out-unshifted")
        attack = generate_attack_set(bundle.decoupled, held_out[:args.n_attack], test.labels[half:half + args.n_attack],
                                     "fgsm", seed=0, progress=False)
        fgsm = attack.adversarial[attack.success]
        before = {"threshold": load_detector(load_bundle(copy)).threshold_,
                  "shifted_held_out": flag_rate(copy, held_out), "unshifted_held_out": flag_rate(copy, unshifted),
                  "shifted_fgsm": flag_rate(copy, fgsm)}
        code = pathguard(["fit", "--bundle", str(copy), "--calibrate-only", "--calibration-images",
                          str(work / "traffic"), "--device", "cpu", "--no-progress"])
        if code:
            raise SystemExit(code)
        profile = json.loads((copy / "profile.json").read_text())
        after = {"threshold": profile["threshold"], "shifted_held_out": flag_rate(copy, held_out),
                 "unshifted_held_out": flag_rate(copy, unshifted), "shifted_fgsm": flag_rate(copy, fgsm),
                 "calibration": {k: v for k, v in profile["calibration"].items() if k != "source"}}
    result = {"bundle": args.bundle, "shift": {"contrast": args.contrast, "lift": args.lift},
              "calibration_images": half, "held_out_images": len(shifted) - half,
              "fgsm": {"attacked": args.n_attack, "successful": len(fgsm)},
              "shipped_threshold": before, "recalibrated": after, "wall_seconds": time.time() - started}
    print(f"shifted clean images (x' = {args.contrast} x + {args.lift}), {len(shifted) - half} held out: flagged "
          f"{before['shifted_held_out']:.4f} at the shipped threshold {before['threshold']:.4f}, "
          f"{after['shifted_held_out']:.4f} at the threshold set on {half} others ({after['threshold']:.4f}); "
          f"unshifted: {before['unshifted_held_out']:.4f} -> {after['unshifted_held_out']:.4f}; "
          f"{len(fgsm)} successful FGSM examples of shifted images: {before['shifted_fgsm']:.4f} -> "
          f"{after['shifted_fgsm']:.4f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
