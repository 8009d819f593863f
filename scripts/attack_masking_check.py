"""Gradient-masking check (issue 11, item 4): the standard attacks directly
on the gated model and through BPDA (the soft-gate surrogate), side by side.

The binary gates are step functions, so a plain attack's gradient ignores
them.  BPDA (attacks/bpda.py) differentiates sigmoid(z / T) in their place
and keeps only adversarial images that fool the real gated model.  If the
gates masked gradients, BPDA would succeed clearly more often.

1. Temperature, on *validation* images (the bundle's own split, never test
   images): for each T of ``--temperatures``, the surrogate's fidelity on
   clean images (share of predictions equal to the real model's, mean
   absolute logit difference) and the success rate of every ``-bpda``
   attack; T is the one with the highest mean success (ties: higher
   fidelity).
2. Test: ``--n`` correctly classified test images (class-stratified,
   seeded); every attack directly and through BPDA at the chosen T, both
   forms of the surrogate (``strict``: the real model's forward pass and the
   soft network's gradient, BPDA proper; ``soft``: the soft network both
   ways).  Per row: success rate (judged on the real model, as in the
   evaluation), median L2 and mean L-inf of the successes, and the bundle's
   path detector on them (share flagged at its stored threshold, AUROC
   against the clean originals).

    .venv/bin/python scripts/attack_masking_check.py [--n 300] [--val-n 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from pathguard.attacks.bpda import SoftGateSurrogate
from pathguard.attacks.generate import AttackSet, generate_attack_set
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle, load_detector
from pathguard.detector.metrics import detection_metrics

from pathguard.jobs.attack import select_correct
from pathguard.jobs.data import load_for, train_validation

ATTACKS = ("deepfool", "deepfool-paper", "cw", "fgsm", "pgd")
FORMS = {"strict": True, "soft": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--n", type=int, default=300, help="correctly classified test images")
    parser.add_argument("--val-n", type=int, default=100, help="validation images for the choice of T")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--select-attacks", nargs="+", default=["fgsm", "pgd", "cw", "deepfool"], choices=ATTACKS,
                        help="attacks whose BPDA success chooses T")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def fidelity(model: torch.nn.Module, images: torch.Tensor, temperature: float) -> dict:
    """How close the soft network's logits are to the real model's."""
    with torch.no_grad():
        real = model(images)
        soft = SoftGateSurrogate(model, temperature)(images)
    return {"agreement": float((soft.argmax(1) == real.argmax(1)).float().mean()),
            "logit_mae": float((soft - real).abs().mean())}


def attack(model, images, labels, name: str, seed: int, overrides: dict | None = None) -> AttackSet:
    return generate_attack_set(model, images, labels, name, seed=seed, overrides=overrides, progress=False)


def choose_temperature(model, images, labels, args) -> tuple[float, list[dict]]:
    rows = []
    for temperature in args.temperatures:
        row = {"temperature": temperature, **fidelity(model, images, temperature), "success": {}}
        for name in args.select_attacks:
            s = attack(model, images, labels, f"{name}-bpda", args.seed,
                       {"temperature": temperature, "real_forward": True})
            row["success"][name] = s.success_rate
        row["mean_success"] = float(np.mean(list(row["success"].values())))
        rows.append(row)
        print(f"  T={temperature:<6} agreement {row['agreement']:.3f}  logit MAE {row['logit_mae']:.3f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in row["success"].items())
              + f"  mean {row['mean_success']:.3f}", flush=True)
    best = max(rows, key=lambda r: (round(r["mean_success"], 6), r["agreement"], -r["logit_mae"]))
    return best["temperature"], rows


def describe(s: AttackSet, detector, model, clean_scores: np.ndarray) -> dict:
    row = {"success_rate": s.success_rate, "n_success": s.n_success,
           "median_l2": float(s.l2[s.success].median()) if s.n_success else None,
           "mean_linf": float(s.linf[s.success].mean()) if s.n_success else None, "wall_time_s": s.wall_time}
    if s.n_success >= 2:
        scores = detector.score_samples(detector.observe(model, s.adversarial[s.success]))
        row["flagged"] = float((scores > detector.threshold_).mean())
        row["auroc"] = detection_metrics(clean_scores[s.success.numpy()], scores)["auroc"]
    return row


def test_rows(model, detector, images, labels, temperature: float, args, result: dict) -> list[dict]:
    """Every attack directly and through BPDA; ``result`` (with the rows so
    far) is rewritten to ``--json`` after each row, so a long run that is
    stopped keeps what it measured."""
    clean_scores = detector.score_samples(detector.observe(model, images))
    rows = result.setdefault("test", [])
    for name in args.attacks:
        runs = [("direct", name, None)] + [
            (form, f"{name}-bpda", {"temperature": temperature, "real_forward": FORMS[form]}) for form in args.forms]
        for form, preset, overrides in runs:
            s = attack(model, images, labels, preset, args.seed, overrides)
            row = {"attack": name, "form": form, **describe(s, detector, model, clean_scores)}
            rows.append(row)
            print(format_row(row), flush=True)
            write_json(args.json, result)
    return rows


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def format_row(row: dict) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    return (f"  {row['attack']:<15}{row['form']:<8}{fmt(row['success_rate'], '.3f'):>8}{row['n_success']:>6}"
            f"{fmt(row['median_l2'], '.3f'):>10}{fmt(row['mean_linf'], '.3f'):>9}"
            f"{fmt(row.get('flagged'), '.3f'):>9}{fmt(row.get('auroc'), '.3f'):>8}{row['wall_time_s']:>8.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    bundle = load_bundle(args.bundle)
    model = bundle.decoupled.eval()
    detector = load_detector(bundle)
    spec = bundle.data_spec
    _, validation = train_validation(bundle, spec)
    val_index = select_correct(model, validation.images, validation.labels, args.val_n, args.seed)
    print(f"choosing T on {len(val_index)} correctly classified validation images (strict BPDA):", flush=True)
    temperature, sweep = choose_temperature(model, validation.images[val_index], validation.labels[val_index], args)
    print(f"chosen T = {temperature}", flush=True)
    test = load_for(bundle, spec, "test")
    index = select_correct(model, test.images, test.labels, args.n, args.seed)
    print(f"\n{len(index)} correctly classified test images; detector {detector.name}, "
          f"threshold {detector.threshold_:.4f}", flush=True)
    print(f"  {'attack':<15}{'form':<8}{'success':>8}{'n':>6}{'med L2':>10}{'Linf':>9}{'flagged':>9}"
          f"{'AUROC':>8}{'time':>8}")
    result = {"temperature": temperature, "sweep": sweep, "images": len(index),
              "validation_images": len(val_index), "threads": torch.get_num_threads()}
    test_rows(model, detector, test.images[index], test.labels[index], temperature, args, result)
    result.update(load_average_1min=os.getloadavg()[0], wall_time_s=time.time() - start)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
