"""How fast the default evaluation could ever be on this machine: a lower
bound from the model's own arithmetic.

``pathguard evaluate`` with its defaults (the protocol: N = 2,000 evaluation
images, 1,000 supervised training images, the presets of
``pathguard.attacks.presets``) has to run, whatever the code around it does,

  * every attack step of every attack set: one forward pass and one
    input-gradient pass per image and step (FGSM 1 step, BIM and PGD their
    ``steps``; CW at least until its first early-stop check, torchattacks
    checks every ``steps // 10`` steps, so ``steps // 10 + 1`` steps; DeepFool
    at least one linearisation, a forward pass and K - 1 backward passes);
  * one forward pass over each image it reads: the training part (the
    baselines are fitted on it), the test split (the evaluation images are
    chosen from it and the threshold's false-positive rate is measured on
    all of it), the validation part (the supervised training images are
    chosen from it) and the natural set (9 groups of N).

So that the floor holds for any implementation, not only this one, an
image's clean forward pass counts once, and so does the gradient that FGSM
and BIM (and their low-budget twins) all take first on the same images: the
cross-entropy gradient at the clean image (PGD starts at a random point, CW
from its own loss).

This measures, in one run and with one torch thread (what each attack worker
uses), the time per image of each of those three kinds of pass on real test
images at the attack batch size, multiplies by the counts, and divides by
the cores as if the work were spread over them perfectly (no start-up, no
scoring, no fitting, no waiting).  It prints that floor as a ratio to the
10-minute target of issue 11, beside the same arithmetic with CW's full
``steps`` (the recorded reports' CW sets took as long per image-step as
PGD's, i.e. they ran every step).  Everything else the evaluation does
(scoring, fitting the baselines and the supervised detectors, adversarial
and noisy copies, reports) comes on top.

    .venv/bin/python bench/bench_evaluation_floor.py [--bundle bundles/fmnist-default]
        [--batch 128] [--repeats 5] [--cores N] [--target-s 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pathguard.attacks.deepfool import BatchedDeepFool  # noqa: E402
from pathguard.attacks.generate import DEFAULT_BATCH_SIZE, attack_mode  # noqa: E402
from pathguard.attacks.presets import PRESETS  # noqa: E402
from pathguard.detector.acceleration import dense_flops  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from pathguard.detector.devices import usable_cpus  # noqa: E402
from pathguard.detector.natural import natural_ood  # noqa: E402
from pathguard.detector.paths import observe  # noqa: E402
from pathguard.jobs.data import data_spec, load_for, train_validation  # noqa: E402
from pathguard.jobs.evaluate import Config  # noqa: E402


def attack_passes(name: str, images: int) -> dict:
    """Per attack set of ``images`` images: the fewest gradient image-steps
    and DeepFool linearisations it can take, and the gradient image-steps of
    a run through every step."""
    if name not in PRESETS:
        raise ValueError(f"{name}: not one of the protocol's attacks {list(PRESETS)}")
    preset = PRESETS[name]
    cls, steps = preset.attack_class, preset.params.get("steps", 1)
    if issubclass(cls, torchattacks.DeepFool):
        return {"gradient_min": 0, "gradient_full": 0, "deepfool_min": images, "deepfool_full": images * steps}
    if issubclass(cls, torchattacks.FGSM):
        least = most = 1
    elif issubclass(cls, (torchattacks.BIM, torchattacks.PGD)):
        least = most = steps
    elif issubclass(cls, torchattacks.CW):
        # torchattacks' CW may return at the check after step steps // 10 (steps are counted from 0)
        least, most = min(steps, max(steps // 10, 1) + 1), steps
    else:
        raise ValueError(f"{name}: no step count known for {cls.__name__}")
    return {"gradient_min": images * least, "gradient_full": images * most, "deepfool_min": 0, "deepfool_full": 0}


def protocol_counts(cfg: Config, train: int, validation: int, test: int, natural_groups: int) -> dict:
    """Image-passes the evaluation ``cfg`` describes, at the least and with
    every attack step; forward passes over the sets it reads."""
    groups = {"": (cfg.attacks, cfg.n)}
    if cfg.supervised:
        groups["supervised:"] = (cfg.supervised_attacks, cfg.n_supervised)
    per_set, shared = {}, 0
    for prefix, (names, images) in groups.items():
        per_set.update({f"{prefix}{name}": attack_passes(name, images) for name in names})
        # one clean-image gradient serves every FGSM / BIM set of the same images
        starts = sum(issubclass(PRESETS[name].attack_class, (torchattacks.FGSM, torchattacks.BIM)) for name in names)
        shared += max(starts - 1, 0) * images
    totals = {key: sum(row[key] for row in per_set.values()) for key in next(iter(per_set.values()))}
    totals["gradient_min"] -= shared
    forward = train + test + (validation if cfg.supervised else 0) + (natural_groups * cfg.n if cfg.natural else 0)
    return {"sets": per_set, **totals, "shared_clean_gradients": shared, "forward_images": forward}


def per_image_seconds(fn, images: int, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", type=int, default=None, help="cores to spread over (default: usable ones)")
    parser.add_argument("--target-s", type=float, default=600.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cores = args.cores or usable_cpus()
    bundle = load_bundle(args.bundle)
    model = bundle.decoupled
    spec = data_spec(bundle)
    test = load_for(bundle, spec, "test")
    train, val = train_validation(bundle, spec)
    cfg = Config(bundle=str(bundle.path))
    groups = len(natural_ood(test.images[:2]).groups)
    counts = protocol_counts(cfg, len(train), len(val), len(test), groups)

    x, y = test.images[:args.batch], test.labels[:args.batch]
    deepfool = BatchedDeepFool(model)

    def gradient_step():
        xb = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xb), y), xb)

    def forward():
        observe(model, x)

    with attack_mode(model):  # eval mode, frozen weights: as the attacks run
        seconds = {
            "gradient_step": per_image_seconds(gradient_step, len(x), args.repeats),
            "deepfool_linearisation": per_image_seconds(lambda: deepfool.differences(x, y), len(x), args.repeats),
            "forward": per_image_seconds(forward, len(x), args.repeats),
        }
    macs = dense_flops(model, x.shape[1:])["total"]  # convolutions, gate modules, head

    def cpu_seconds(gradient: int, linearisations: int) -> float:
        return (gradient * seconds["gradient_step"] + linearisations * seconds["deepfool_linearisation"]
                + counts["forward_images"] * seconds["forward"])

    floor_cpu = cpu_seconds(counts["gradient_min"], counts["deepfool_min"])
    full_cw_cpu = cpu_seconds(counts["gradient_full"] - counts["shared_clean_gradients"], counts["deepfool_min"])
    result = {
        "machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
        "bundle": str(bundle.path), "threads": 1, "batch": len(x), "repeats": args.repeats, "cores": cores,
        "target_s": args.target_s, "evaluation": {"n": cfg.n, "n_supervised": cfg.n_supervised,
                                                  "attacks": list(cfg.attacks),
                                                  "supervised_attacks": list(cfg.supervised_attacks)},
        "seconds_per_image": seconds, "counts": counts, "forward_macs_per_image": macs,
        # forward + input gradient: about twice the forward's multiply-accumulates, 2 FLOP each
        "gradient_step_gflops": 2 * 2 * macs / seconds["gradient_step"] / 1e9,
        "floor_cpu_s": floor_cpu, "floor_wall_s": floor_cpu / cores,
        "floor_over_target": floor_cpu / cores / args.target_s,
        "full_steps_cpu_s": full_cw_cpu, "full_steps_wall_s": full_cw_cpu / cores,
        "full_steps_over_target": full_cw_cpu / cores / args.target_s,
    }
    print(f"{result['machine']}, torch {result['torch']}, 1 thread, batches of {len(x)}, median of "
          f"{args.repeats}; bundle {bundle.path}")
    print(f"per image: gradient step {1e3 * seconds['gradient_step']:.2f} ms "
          f"(about {result['gradient_step_gflops']:.0f} GFLOP/s from {macs / 1e6:.1f} M MACs per forward), "
          f"DeepFool linearisation {1e3 * seconds['deepfool_linearisation']:.2f} ms, "
          f"forward {1e3 * seconds['forward']:.2f} ms")
    print(f"{'set':<18} {'gradient steps (least / all)':>30} {'linearisations':>15}")
    for key, row in counts["sets"].items():
        print(f"{key:<18} {row['gradient_min']:>14,} / {row['gradient_full']:<13,} {row['deepfool_min']:>15,}")
    print(f"least in all: {counts['gradient_min']:,} gradient steps (the sets' {counts['gradient_min'] + counts['shared_clean_gradients']:,} "
          f"less {counts['shared_clean_gradients']:,} clean-image gradients shared by FGSM and BIM sets), "
          f"{counts['deepfool_min']:,} linearisations, {counts['forward_images']:,} forward passes over clean "
          f"and natural images")
    print(f"floor: {floor_cpu:,.0f} CPU-s = {result['floor_wall_s']:,.0f} s on {cores} core(s), "
          f"{result['floor_over_target']:.2f}x the {args.target_s:.0f} s target")
    print(f"with every CW step (DeepFool still one linearisation per image): {full_cw_cpu:,.0f} CPU-s = "
          f"{result['full_steps_wall_s']:,.0f} s, {result['full_steps_over_target']:.2f}x the target")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
