"""Your own images, measured: the stored threshold's false-positive rate on
a real image folder (docs/own-images.md, "Measured").

1. Builds a 4-class folder of PNGs from Fashion-MNIST (Trouser, Sneaker,
   Bag, Ankle boot): ROOT/train/<class>/ with --train-per-class images per
   class drawn (seeded) from Fashion-MNIST's train split and ROOT/test/<class>/
   with --test-per-class from its test split.  Like a user's folder, it is
   not uniform: every 5th image of a class is saved as a lightly tinted RGB
   PNG and every 7th at 32x32 (resized up with Pillow's bilinear filter).
2. Runs `pathguard train --dataset folder --data-root ROOT --image-size 28
   --channels 1` (the conversions are printed as "note:" lines) with the
   vgg-small recipe the committed figures were measured with (VGG_SMALL_RECIPE;
   the default vgg7 takes hours on a 2-core CPU).  Even its 6 + 6 epochs
   are slow there: the default here is --epochs-plain 2 --epochs-decoupled 2.
3. Runs `pathguard fit --bundle BUNDLE --score auto --ablation-attacks fgsm
   pgd cw` (the bundle's own folder): the threshold is calibrated on clean
   validation images and checked on the clean test folder.
4. Checks that figure independently: the bundle's Inspector on the test
   folder (loaded with the bundle's data spec) must flag the same share.

Writes OUTPUT/results.json (+ train.log, fit.log) with the threshold, its
FPR on the clean test folder (all images, correctly classified ones), the
test accuracy, the wall time of each step and the machine.  Usage:

    .venv/bin/python scripts/own_images_experiment.py [--output reports/own-images] [--root DIR]
        [--epochs-plain 2] [--epochs-decoupled 2] [--seed 0] [--val-fraction 0.2] [--threads N] [--keep]

Acceptance (the issue): the stored threshold's FPR on the clean test folder
is within 5% +- 1.5 points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pathguard.detector.bundle import load_bundle
from pathguard.detector.data import load_dataset, load_split
from pathguard.detector.inspection import Inspector

CLASSES = {1: "Trouser", 7: "Sneaker", 8: "Bag", 9: "Ankle boot"}  # Fashion-MNIST label -> folder name
TINT = np.array([1.0, 0.92, 0.84])  # light warm tint of the RGB copies
MARKER = "own_images_experiment.json"
ACCEPT = (0.05, 0.015)  # target FPR, tolerance (points / 100)


def build_folder(root: Path, per_class: dict[str, int], seed: int) -> dict:
    """ROOT/{train,test}/<class>/*.png from Fashion-MNIST; returns what was
    saved how.  A folder this script built with the same settings is reused."""
    recipe = {"classes": CLASSES, "per_class": per_class, "seed": seed, "rgb": "every 5th (k % 5 == 0), tinted",
              "resized_to_32": "every 7th (k % 7 == 0)", "format": "PNG"}
    marker = root / MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["recipe"] == json.loads(json.dumps(recipe)):
            print(f"reusing the folder at {root}")
            return saved["counts"]
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists and was not built by this script with these settings: "
                         f"choose another --root")
    counts = {}
    for offset, (split, n) in enumerate(per_class.items()):
        data = load_dataset("fashion-mnist", split)
        labels = data.labels.numpy()
        rng = np.random.default_rng([seed, offset])
        tally = {"images": 0, "rgb": 0, "resized_to_32": 0}
        for label, name in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            picks = np.sort(rng.choice(np.flatnonzero(labels == label), n, replace=False))
            for k, index in enumerate(picks):
                img = Image.fromarray((data.images[index, 0].numpy() * 255).round().astype(np.uint8), "L")
                if k % 7 == 0:
                    img = img.resize((32, 32), Image.Resampling.BILINEAR)
                    tally["resized_to_32"] += 1
                if k % 5 == 0:
                    rgb = np.asarray(img, dtype=np.float64)[:, :, None] * TINT
                    img = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
                    tally["rgb"] += 1
                img.save(folder / f"fmnist-{split}-{index:05d}.png")
                tally["images"] += 1
        counts[split] = tally
    marker.write_text(json.dumps({"recipe": recipe, "counts": counts}, indent=2))
    return counts


def run_step(name: str, argv: list[str], log: Path, env: dict) -> float:
    """`pathguard ARGV` as a user runs it; output shown and kept in LOG;
    returns the wall time in seconds."""
    command = [sys.executable, "-m", "pathguard", *argv]
    print(f"\n$ pathguard {' '.join(argv)}", flush=True)
    started = time.time()
    with open(log, "w") as out:
        out.write("$ pathguard " + " ".join(argv) + "\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            sys.stdout.write(line)
            out.write(line)
        code = process.wait()
    seconds = time.time() - started
    if code != 0:
        raise SystemExit(f"pathguard {name} failed (exit {code}); see {log}")
    print(f"[{name}: {seconds:.1f} s]", flush=True)
    return seconds


def cross_check(bundle_path: Path) -> dict:
    """The threshold's FPR on the clean test folder, recomputed with the
    bundle's Inspector on the folder as the bundle's data spec loads it."""
    bundle = load_bundle(bundle_path)
    test = load_split(bundle.data_spec, "test")
    results = Inspector.load(bundle_path).inspect(test.images)
    flags = np.array([r.adversarial for r in results])
    correct = np.array([r.predicted_class for r in results]) == test.labels.numpy()
    return {"test_images": len(test), "fpr_all": float(flags.mean()),
            "fpr_correctly_classified": float(flags[correct].mean()), "accuracy": float(correct.mean())}


def machine(threads: int | None) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": list(os.getloadavg())}


# The recipe the committed figures were measured with: the defaults of
# `train` and `fit` before the vgg7 default (issue 10), which a 2-core CPU
# trains in minutes rather than hours.
VGG_SMALL_RECIPE = ["--architecture", "vgg-small", "--lambda-m", "0.2", "--target-ratio", "0.55",
                    "--max-active-ratio", "0.6", "--distill-weight", "0"]
VGG_SMALL_FIT = ["--score", "auto", "--ablation-attacks", "fgsm", "pgd", "cw"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="where to build the image folder (default: a temporary "
                        "directory, removed at the end unless --keep)")
    parser.add_argument("--output", default="reports/own-images", help="where results.json and the logs go")
    parser.add_argument("--bundle", default=None, help="bundle directory to write (default: beside the folder)")
    parser.add_argument("--epochs-plain", type=int, default=2, help="stage 1 epochs (vgg-small's recipe: 6)")
    parser.add_argument("--epochs-decoupled", type=int, default=2, help="stage 2 epochs (vgg-small's recipe: 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folder's images, the split and training")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the training folder held out for validation: half for fit's ablation, "
                             "half to calibrate the threshold (0.2 of 6000 = 600 calibration images)")
    parser.add_argument("--train-per-class", type=int, default=1500)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and bundle")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.time()
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    scratch = None if args.root else Path(tempfile.mkdtemp(prefix="pathguard-own-images-"))
    root = Path(args.root).resolve() if args.root else scratch / "photos"
    bundle = Path(args.bundle).resolve() if args.bundle else root.parent / f"{root.name}-bundle"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    info = machine(args.threads)
    try:
        t = time.time()
        counts = build_folder(root, {"train": args.train_per_class, "test": args.test_per_class}, args.seed)
        times = {"build_folder": time.time() - t}
        train = ["train", "--dataset", "folder", "--data-root", str(root), "--image-size", "28", "--channels", "1",
                 *VGG_SMALL_RECIPE,
                 "--epochs-plain", str(args.epochs_plain), "--epochs-decoupled", str(args.epochs_decoupled),
                 "--val-fraction", str(args.val_fraction), "--seed", str(args.seed), "--output", str(bundle),
                 "--force", "--no-progress"] + (["--threads", str(args.threads)] if args.threads else [])
        times["train"] = run_step("train", train, output / "train.log", env)
        fit = ["fit", "--bundle", str(bundle), *VGG_SMALL_FIT, "--seed", str(args.seed), "--no-progress"]
        times["fit"] = run_step("fit", fit, output / "fit.log", env)
        t = time.time()
        check = cross_check(bundle)
        times["cross_check"] = time.time() - t
        results = summarise(args, bundle, root, counts, check, times, info, train, fit)
        results["wall_seconds"]["total"] = time.time() - started
    finally:
        if scratch is not None and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, output)


def summarise(args, bundle: Path, root: Path, counts: dict, check: dict, times: dict, info: dict,
              train: list[str], fit: list[str]) -> dict:
    profile = json.loads((bundle / "profile.json").read_text())
    card = json.loads((bundle / "model_card.json").read_text())
    data = json.loads((bundle / "data.json").read_text())
    stored = profile["threshold_check"]
    n = stored["test_images"]
    target, tolerance = ACCEPT
    return {
        "folder": {"root": str(root), "kept": bool(args.root or args.keep), "classes": data["spec"]["classes"],
                   "saved": counts, "notes": data["notes"]},
        "commands": {"train": "pathguard " + " ".join(train), "fit": "pathguard " + " ".join(fit)},
        "epochs": {"plain": args.epochs_plain, "decoupled": args.epochs_decoupled,
                   "note": "the recipe's default is 6 + 6; 2 + 2 here to fit a 2-core CPU"},
        "split": data["split"],
        "detector": {"score": profile["detector"], "threshold": profile["threshold"],
                     "target_fpr": stored["target_fpr"],
                     "calibration_images": profile["calibration"]["clean_validation_images"],
                     "ablation_images": profile["ablation"]["validation_images"],
                     "ablation_mean_auroc": {s: r["mean_auroc"] for s, r in profile["ablation"]["results"].items()}},
        "threshold_check": {
            **stored,
            "standard_error": math.sqrt(target * (1 - target) / n),
            "acceptance": f"|FPR - {target}| <= {tolerance}",
            "accepted": abs(stored["fpr_all"] - target) <= tolerance,
        },
        "cross_check_with_inspector": check,
        "test_accuracy": {"decoupled": card["test"]["decoupled_accuracy"], "plain": card["test"]["plain_accuracy"],
                          "images": card["test"]["images"]},
        "wall_seconds": times,
        "machine": info,
    }


def print_summary(results: dict, output: Path) -> None:
    check, det = results["threshold_check"], results["detector"]
    print("\n== own-images experiment ==")
    print(f"score {det['score']}, threshold {det['threshold']:.6g} (target FPR {det['target_fpr']}, "
          f"{det['calibration_images']} calibration images)")
    print(f"FPR on the {check['test_images']} clean test images: all {check['fpr_all']:.4f}, correctly classified "
          f"{check['fpr_correctly_classified']:.4f}  (standard error {check['standard_error']:.4f}; "
          f"{check['acceptance']}: {'yes' if check['accepted'] else 'NO'})")
    print(f"inspector cross-check: all {results['cross_check_with_inspector']['fpr_all']:.4f}")
    acc = results["test_accuracy"]
    print(f"test accuracy: decoupled {acc['decoupled']:.4f}, plain {acc['plain']:.4f}")
    print("wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["wall_seconds"].items()))
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"{results['machine']['torch_threads']} torch threads")
    print(f"written to {output / 'results.json'}")


if __name__ == "__main__":
    main()
