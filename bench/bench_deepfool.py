"""Batched DeepFool (the ``deepfool`` preset) against torchattacks' per-image
DeepFool (``deepfool-reference``), on real images of a bundle, in one run.

Both attack the same N correctly classified test images (class-stratified,
seeded, as ``pathguard attack`` draws them) with the protocol's settings
(50 steps, overshoot 0.02) through ``generate_attack_set``, so success is
judged exactly as in the evaluation.  The batched attack runs before and
after the reference, and its time is the mean of the two, so a drift in
machine load hits both alike.  Printed: success rate, median L2 over the
successes (and over the images both fool), how far apart the two sets of
adversarial images are, how many adversarials sit on the decision boundary
(top-two logits within 1e-4: there float rounding decides "success"),
wall and CPU times and the ratios reference / batched (CPU time is the
fairer one on a shared machine).  ``--paper`` adds the
``deepfool-paper`` preset (overshoot on the summed perturbation).

    .venv/bin/python bench/bench_deepfool.py [--bundle DIR] [--n 64] [--paper] [--json out.json]

Exit status 1 when the cross-check fails: fewer than 95% of the adversarial
images equal to 1e-4, success rates more than ``--tolerance`` apart beyond
the share of boundary ties, or median L2 on the images both fool more than
5% apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from pathguard.attacks.generate import AttackSet, generate_attack_set
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle

from pathguard.jobs.attack import select_correct
from pathguard.jobs.data import load_for

BOUNDARY_MARGIN = 1e-4


def summary(model: torch.nn.Module, s: AttackSet, cpu_time: float) -> dict:
    with torch.no_grad():
        top2 = model(s.adversarial).topk(2, dim=1).values
    on_boundary = (top2[:, 0] - top2[:, 1]) < BOUNDARY_MARGIN
    return {
        "success_rate": s.success_rate,
        "median_l2_success": float(s.l2[s.success].median()) if s.n_success else None,
        "on_boundary": float(on_boundary.float().mean()),
        "wall_time_s": s.wall_time,
        "cpu_time_s": cpu_time,
    }


def compare(reference: AttackSet, batched: AttackSet) -> dict:
    both = reference.success & batched.success
    diff = (reference.adversarial - batched.adversarial).flatten(1).abs().amax(dim=1)
    return {
        "max_abs_difference": float(diff.max()),
        "share_identical_1e-4": float((diff <= 1e-4).float().mean()),
        "share_same_outcome": float((reference.success == batched.success).float().mean()),
        "fooled_by_both": int(both.sum()),
        "median_l2_both": ([float(reference.l2[both].median()), float(batched.l2[both].median())]
                           if both.any() else None),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--n", type=int, default=64, help="correctly classified test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="success-rate difference allowed")
    parser.add_argument("--paper", action="store_true", help="also run the deepfool-paper preset")
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model = bundle.decoupled.eval()
    data = load_for(bundle, bundle.data_spec, "test")
    index = select_correct(model, data.images, data.labels, args.n, args.seed)
    images, labels = data.images[index], data.labels[index]
    sets, cpu = {}, {}

    def attack(name: str) -> AttackSet:
        start = time.process_time()
        s = generate_attack_set(model, images, labels, name, seed=args.seed, batch_size=args.batch_size,
                                progress=False)
        cpu.setdefault(name, []).append(time.process_time() - start)
        return s

    load_before = os.getloadavg()[0]
    first = attack("deepfool")
    sets["deepfool-reference"] = attack("deepfool-reference")
    sets["deepfool"] = attack("deepfool")
    if args.paper:
        sets["deepfool-paper"] = attack("deepfool-paper")
    result = {name: summary(model, s, sum(cpu[name]) / len(cpu[name])) for name, s in sets.items()}
    batched_time = (first.wall_time + sets["deepfool"].wall_time) / 2
    result["deepfool"]["wall_time_s"] = batched_time
    result["deepfool"]["wall_time_runs_s"] = [first.wall_time, sets["deepfool"].wall_time]
    result["comparison"] = compare(sets["deepfool-reference"], sets["deepfool"])
    result["speedup"] = sets["deepfool-reference"].wall_time / batched_time
    result["speedup_cpu_time"] = result["deepfool-reference"]["cpu_time_s"] / result["deepfool"]["cpu_time_s"]
    result["setting"] = {"images": len(images), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                         "load_average_1min": [load_before, os.getloadavg()[0]], "bundle": str(args.bundle)}
    return result


def verdict(result: dict, tolerance: float) -> list[str]:
    ref, new = result["deepfool-reference"], result["deepfool"]
    failures = []
    ties = max(ref["on_boundary"], new["on_boundary"])
    if abs(ref["success_rate"] - new["success_rate"]) > tolerance + ties:
        failures.append(f"success rates {ref['success_rate']:.3f} vs {new['success_rate']:.3f}")
    if result["comparison"]["share_identical_1e-4"] < 0.95:
        failures.append(f"only {result['comparison']['share_identical_1e-4']:.3f} of the adversarial images agree to 1e-4")
    l2 = result["comparison"]["median_l2_both"]
    if l2 and abs(l2[0] - l2[1]) > 0.05 * l2[0]:
        failures.append(f"median L2 on the images both fool {l2[0]:.4f} vs {l2[1]:.4f}")
    return failures


def report(result: dict) -> None:
    print(f"{result['setting']['images']} images, {result['setting']['threads']} threads, "
          f"load average {result['setting']['load_average_1min']}")
    print(f"{'attack':<20}{'success':>9}{'median L2':>11}{'on boundary':>13}{'wall (s)':>10}{'CPU (s)':>10}")
    for name in ("deepfool-reference", "deepfool", "deepfool-paper"):
        if name in result:
            r = result[name]
            l2 = "n/a" if r["median_l2_success"] is None else f"{r['median_l2_success']:.4f}"
            print(f"{name:<20}{r['success_rate']:>9.3f}{l2:>11}{r['on_boundary']:>13.3f}{r['wall_time_s']:>10.1f}"
                  f"{r['cpu_time_s']:>10.1f}")
    c = result["comparison"]
    print(f"reference vs batched: max |difference| {c['max_abs_difference']:.2e}, identical (1e-4) "
          f"{c['share_identical_1e-4']:.3f}, same outcome {c['share_same_outcome']:.3f}, "
          f"median L2 on the {c['fooled_by_both']} fooled by both {c['median_l2_both']}")
    print(f"speed-up (reference time / batched time): {result['speedup']:.1f}x wall, "
          f"{result['speedup_cpu_time']:.1f}x CPU")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    report(result)
    failures = verdict(result, args.tolerance)
    result["cross_check"] = {"passed": not failures, "failures": failures}
    print("cross-check: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
