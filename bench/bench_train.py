"""Training-step time: float32 vs bfloat16 autocast (`pathguard train --precision`).

Times the real training step of `pathguard train` (``_train_step``: forward,
losses, backward, SGD step) for each kind of epoch of the default recipe:
the plain net (stage 1 and the plain reference) and the decoupled net
(stage 2: alignment, path-class, sparsity and distillation terms, the
teacher's forward pass included).  Each kind runs in both precisions,
interleaved step by step on the same batches of real Fashion-MNIST
training images, each precision on its own copy of the same initial
weights, so drifts in machine load hit both alike.  It prints the median
seconds per step, the ratio fp32 / bf16, and what one epoch of the recipe
(54,000 images) and the whole recipe (epochs from `pathguard train`'s
defaults) would take at those medians.

    .venv/bin/python bench/bench_train.py [--architecture vgg7] [--steps 12] [--batch-size 128]
        [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench_sparse import cpu_name  # noqa: E402
from pathguard.detector.data import load_dataset, normalisation_stats  # noqa: E402
from pathguard.detector.losses import DecouplingWeights  # noqa: E402
from pathguard.detector.models import ARCHITECTURES, ConvNet, architecture_for  # noqa: E402
from pathguard.jobs.train import (  # noqa: E402
    PRECISIONS, Config, _stage2, _Stage, _train_step, bf16_is_native, decoupling_weights,
)

TRAIN_IMAGES = 54_000  # the recipe's training part (60,000 less the 10% validation split)


def build_stages(cfg: Config, arch, steps: int) -> dict[str, tuple[_Stage, DecouplingWeights | None]]:
    """The two kinds of training step of the recipe, as `pathguard train`
    builds them (fresh weights of seed ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    plain = ConvNet(arch, gated=False)
    decoupled, _ = _stage2(cfg, arch, copy.deepcopy(plain), steps)
    decoupled.model.gate_noise, decoupled.model.gate_hard_prob = cfg.gate_noise, 0.5  # stage 2's first epoch
    stages = {"plain": (_Stage("plain", plain, cfg.lr_plain, cfg.epochs_plain, steps, cfg), None),
              "decoupled": (decoupled, decoupling_weights(cfg))}
    for stage, _ in stages.values():
        stage.model.train()
    return stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default=Config.architecture, choices=tuple(ARCHITECTURES))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per kind and precision (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch-size", type=int, default=Config.batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batches = args.warmup + args.steps
    images = load_dataset("fashion-mnist", "train").head(batches * args.batch_size)
    mean, std = normalisation_stats(images)
    arch = architecture_for(args.architecture, 1, images.shape[1], len(images.classes), list(mean), list(std))
    steps_per_epoch = math.ceil(TRAIN_IMAGES / args.batch_size)
    cpu = torch.device("cpu")
    print(f"machine: {cpu_name()} ({os.cpu_count()} logical CPUs) | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | bf16 native: {bf16_is_native(cpu)}")
    print(f"architecture {args.architecture}, batch {args.batch_size}, {args.steps} timed steps per kind and "
          f"precision after {args.warmup} warm-up steps, interleaved")

    runs = {p: build_stages(Config(precision=p, architecture=args.architecture), arch, steps_per_epoch)
            for p in PRECISIONS}
    times = {(kind, p): [] for kind in ("plain", "decoupled") for p in PRECISIONS}
    for b in range(batches):
        x = images.images[b * args.batch_size:(b + 1) * args.batch_size]
        y = images.labels[b * args.batch_size:(b + 1) * args.batch_size]
        for kind in ("plain", "decoupled"):
            for precision in PRECISIONS:
                stage, weights = runs[precision][kind]
                started = time.perf_counter()
                _train_step(stage, x, y, weights)
                if b >= args.warmup:
                    times[kind, precision].append(time.perf_counter() - started)

    cfg = Config()
    # epochs of each kind in the recipe: stage 1 and the plain reference are plain steps
    epochs = {"plain": cfg.epochs_plain + cfg.epochs_decoupled, "decoupled": cfg.epochs_decoupled}
    result = {"machine": f"{cpu_name()} ({os.cpu_count()} logical CPUs), {platform.machine()}",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "bf16_native": bf16_is_native(cpu),
              "architecture": args.architecture, "batch_size": args.batch_size, "steps": args.steps, "kinds": {}}
    print(f"{'kind':<10} {'fp32 s/step':>12} {'bf16 s/step':>12} {'fp32/bf16':>10} {'fp32 epoch':>11} "
          f"{'bf16 epoch':>11}")
    recipe = {p: 0.0 for p in PRECISIONS}
    for kind in ("plain", "decoupled"):
        median = {p: statistics.median(times[kind, p]) for p in PRECISIONS}
        ratio = median["fp32"] / median["bf16"]
        for p in PRECISIONS:
            recipe[p] += median[p] * steps_per_epoch * epochs[kind]
        result["kinds"][kind] = {"median_s": median, "ratio_fp32_over_bf16": ratio,
                                 "epoch_s": {p: median[p] * steps_per_epoch for p in PRECISIONS}}
        print(f"{kind:<10} {median['fp32']:>12.3f} {median['bf16']:>12.3f} {ratio:>9.2f}x "
              f"{median['fp32'] * steps_per_epoch:>10.0f}s {median['bf16'] * steps_per_epoch:>10.0f}s")
    result["recipe_s"] = recipe
    print(f"the default recipe's {epochs['plain']} plain and {epochs['decoupled']} decoupled epochs on "
          f"{TRAIN_IMAGES:,} images at these medians (no validation or card): fp32 {recipe['fp32'] / 60:.0f} min, "
          f"bf16 {recipe['bf16'] / 60:.0f} min ({recipe['fp32'] / recipe['bf16']:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
