"""Issue 11, items 2-3: the stronger unsupervised baselines on a bundle.

Fits every new baseline (energy, mahalanobis-multi, knn, nic) and, for
reference, max-softmax, the single-layer mahalanobis and the bundle's own
path score, on clean training-part images of the bundle's data (the first
``--n-train``, 10,000 by default; nic draws its ``max_fit`` = 3,000 of them,
observed with activations).  Then:

* AUROC and TPR at 5% FPR on FGSM and PGD (the eps-0.1 presets of
  attacks/presets.py, seed 0) of ``--n-attack`` correctly classified test
  images drawn class-stratified (positives: the successful adversarial
  examples, negatives: their clean originals);
* the flag rate of every natural out-of-distribution group
  (detector/natural.py, built from ``--n-natural`` test images, seed 0) at
  each detector's threshold for 5% FPR on all clean test images (the path
  score also at its stored threshold).

Also reported: nic with ``combine="square"``, and mahalanobis-multi's
blocks one by one and as a plain unstandardised sum (what an equal-weight
ensemble without standardisation gives).  This is a measurement on test
images, not a choice: nothing is tuned here.

    python scripts/baselines_check.py [--bundle bundles/fmnist-default] [--output out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from pathguard.attacks.generate import generate_attack_set
from pathguard.detector.bundle import load_bundle, load_detector
from pathguard.detector.detectors import make_detector
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.natural import natural_ood
from pathguard.detector.paths import observe

from pathguard.jobs.data import data_spec, load_for, train_validation
from pathguard.jobs.evaluate import correct_sample

NEW = ("energy", "mahalanobis-multi", "knn", "nic")
REFERENCE = ("max-softmax", "mahalanobis")
ISSUE_TABLE = {"mahalanobis-multi": {"fgsm": 0.894, "pgd": 0.909}, "knn": {"fgsm": 0.896, "pgd": 0.844},
               "max-softmax": {"fgsm": 0.714, "pgd": 0.443}, "path": {"fgsm": 0.902, "pgd": 0.821}}


def fit_detectors(bundle, train_images: torch.Tensor, train_labels: torch.Tensor, seed: int) -> tuple[dict, dict]:
    model = bundle.decoupled
    detectors, seconds = {"path": load_detector(bundle)}, {}
    clean = observe(model, train_images, labels=train_labels, blocks=True)
    # nic keeps at most max_fit rows: observe only those with their (large) activations
    rows = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    rows = rows[:make_detector("nic").max_fit]
    with_activations = observe(model, train_images[rows], labels=train_labels[rows], activations=True)
    for name, params in [*((n, {}) for n in (*REFERENCE, *NEW)), ("nic", {"combine": "square"})]:
        label = name if not params else f"{name} (combine=square)"
        started = time.time()
        detector = make_detector(name, **params)
        detectors[label] = detector.fit(with_activations if "activations" in detector.requires else clean)
        seconds[label] = round(time.time() - started, 1)
    return detectors, seconds


def scores(model, detectors: dict, images: torch.Tensor, chunk: int = 1000) -> dict[str, np.ndarray]:
    """Every detector's scores, observed in chunks (activations are large)."""
    acts = any("activations" in d.requires for d in detectors.values())
    out = {name: [] for name in detectors}
    for start in range(0, len(images), chunk):
        batch = observe(model, images[start:start + chunk], blocks=True, activations=acts)
        for name, detector in detectors.items():
            out[name].append(detector.score_samples(batch))
        if "mahalanobis-multi" in detectors:  # its blocks one by one, and their plain unstandardised sum
            layers = detectors["mahalanobis-multi"].layer_scores(batch).numpy()
            out.setdefault("mahalanobis-multi: raw sum", []).append(layers.sum(1))
            for i in range(layers.shape[1]):
                out.setdefault(f"mahalanobis-multi: block {i}", []).append(layers[:, i])
    return {name: np.concatenate(parts) for name, parts in out.items()}


def attack_table(model, detectors: dict, test, n_attack: int, seed: int) -> dict:
    evalset = correct_sample(model, test, n_attack, seed, "attack images")
    clean = scores(model, detectors, evalset.images)
    table = {}
    for attack in ("fgsm", "pgd"):
        aset = generate_attack_set(model, evalset.images, evalset.labels, attack, seed=seed, progress=False)
        ok = aset.success
        adv = scores(model, detectors, aset.adversarial[ok])
        table[attack] = {"images": len(evalset), "successes": int(ok.sum()),
                         "detectors": {name: detection_metrics(clean[name][ok.numpy()], adv[name])
                                       for name in adv}}
    return table


def natural_table(model, detectors: dict, test, n_natural: int, seed: int) -> dict:
    test_scores = scores(model, detectors, test.images)
    thresholds = {name: float(np.quantile(s, 0.95, method="higher")) for name, s in test_scores.items()
                  if name in detectors}
    natural = natural_ood(test.images, seed=seed, n=n_natural)
    rates = {}
    for group, images in natural.items():
        group_scores = scores(model, detectors, images)
        rates[group] = {name: float((group_scores[name] > t).mean()) for name, t in thresholds.items()}
        rates[group]["path @ stored threshold"] = float(detectors["path"].flag(group_scores["path"]).mean())
    clean_fpr = {name: float((test_scores[name] > t).mean()) for name, t in thresholds.items()}
    clean_fpr["path @ stored threshold"] = float(detectors["path"].flag(test_scores["path"]).mean())
    return {"thresholds_5pct_test_fpr": thresholds, "clean_test_fpr": clean_fpr, "flag_rate": rates,
            "groups": natural.to_json()["groups"]}


def print_tables(result: dict) -> None:
    names = list(next(iter(result["attacks"].values()))["detectors"])
    print("\nAUROC / TPR@5%FPR   (issue table AUROC in brackets)")
    print(f"{'detector':28s} " + " ".join(f"{a:>24s}" for a in result["attacks"]))
    for name in names:
        cells = []
        for attack, rec in result["attacks"].items():
            m = rec["detectors"][name]
            ref = ISSUE_TABLE.get(name, {}).get(attack)
            cells.append(f"{m['auroc']:.3f} / {m['tpr_at_5fpr']:.2f}" + (f" [{ref:.3f}]" if ref else ""))
        print(f"{name:28s} " + " ".join(f"{c:>24s}" for c in cells))
    natural = result["natural"]
    groups = {"clean test": natural["clean_test_fpr"], **natural["flag_rate"]}
    print("\nflag rate at each detector's threshold for 5% FPR on the clean test split")
    print(f"{'detector':28s} " + " ".join(f"{g.replace('blank-', '').replace('-noise', '')[:10]:>10s}" for g in groups))
    for name in natural["clean_test_fpr"]:
        print(f"{name:28s} " + " ".join(f"{row[name]:10.3f}" for row in groups.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/fmnist-default")
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-attack", type=int, default=300)
    parser.add_argument("--n-natural", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    bundle = load_bundle(args.bundle)
    spec = data_spec(bundle)
    train, _ = train_validation(bundle, spec)
    train, test = train.head(args.n_train), load_for(bundle, spec, "test")
    detectors, seconds = fit_detectors(bundle, train.images, train.labels, args.seed)
    result = {"bundle": args.bundle, "n_train": len(train), "fit_seconds": seconds,
              "attacks": attack_table(bundle.decoupled, detectors, test, args.n_attack, args.seed),
              "natural": natural_table(bundle.decoupled, detectors, test, args.n_natural, args.seed),
              "torch_threads": torch.get_num_threads()}
    result["wall_seconds"] = round(time.time() - started, 1)
    print_tables(result)
    print(f"\nwall time {result['wall_seconds']} s; fit seconds {seconds}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
