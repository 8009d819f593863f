"""How should a supervised detector combine detector v2's channels? Validation images only.

The question behind ``channels-supervised`` (docs/method.md, "Supervised
detection"): trained on FGSM and PGD, which way of combining the channel
p-values still catches attacks it never saw (CW, DeepFool)?  Everything here
is on the bundle's *validation* split (the test split is never read):

  * channel models (every block's value check, every gated layer's class
    evidence, confidence, path) fitted on a seeded draw of clean training
    images, as ``pathguard evaluate`` does;
  * the supervised training set: FGSM and PGD examples of ``--n-train``
    correctly classified validation images (the originals are the clean
    rows), as in the evaluation;
  * a held-out set: ``--n-heldout`` other validation images and their FGSM,
    PGD, BIM, CW and DeepFool examples.

It reports, per combination, the AUROC of each attack on the held-out set:
the unsupervised guard alone (the bundle's detector), unweighted Fisher and
min-p over all channels, an unconstrained logistic regression
(scikit-learn), the non-negative one, the non-negative one shrunk towards
equal weights, and ``channels-supervised`` itself (non-negative weights,
min-p with the guard).

    .venv/bin/python scripts/supervised_combiner_check.py [--n-train 1000] [--n-heldout 300]
        [--json reports/detector-v2/supervised-combiners.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pathguard.attacks.generate import generate_attack_set  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle, load_detector  # noqa: E402
from pathguard.detector.channel_supervised import (  # noqa: E402
    ChannelSupervisedDetector,
    fit_nonnegative_logistic,
    wide_channels,
)
from pathguard.detector.detectors import make_detector  # noqa: E402
from pathguard.detector.paths import observe  # noqa: E402
from pathguard.jobs.data import data_spec, train_validation  # noqa: E402
from pathguard.jobs.evaluate import correct_sample  # noqa: E402

SEEN = ("fgsm", "pgd")
HELD_OUT = ("fgsm", "pgd", "bim", "cw", "deepfool")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-heldout", type=int, default=300)
    parser.add_argument("--channel-images", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()
    bundle = load_bundle(args.bundle)
    model, guard = bundle.decoupled.eval(), load_detector(bundle)
    train, val = train_validation(bundle, data_spec(bundle, None, None))
    part = train.sample(min(args.channel_images, len(train)), args.seed, shrink=True)
    train_batch = observe(model, part.images, labels=part.labels, blocks=True)
    channels = make_detector("channels", channels=wide_channels(train_batch), seed=args.seed).fit(train_batch)
    pool = correct_sample(model, val, args.n_train + args.n_heldout, args.seed, "validation images")
    fit_set = pool.subset(torch.arange(args.n_train))
    heldout = pool.subset(torch.arange(args.n_train, len(pool)))

    def attacked(images, name):
        aset = generate_attack_set(model, images.images, images.labels, name, seed=args.seed, progress=False)
        ok = aset.success
        return observe(model, images.images[ok], blocks=True), observe(model, aset.adversarial[ok], blocks=True)

    pairs = [attacked(fit_set, name) for name in SEEN]
    clean_fit = type(pairs[0][0]).concat([c for c, _ in pairs])
    adv_fit = type(pairs[0][0]).concat([a for _, a in pairs])
    tests = {name: attacked(heldout, name) for name in HELD_OUT}

    def features(batch):
        return (-channels.channel_log_p(batch)).numpy()

    x = np.concatenate([features(clean_fit), features(adv_fit)])
    y = np.r_[np.zeros(len(clean_fit)), np.ones(len(adv_fit))]
    unconstrained = LogisticRegression(max_iter=5000, random_state=args.seed).fit(x, y)
    w_nonneg, b_nonneg = fit_nonnegative_logistic(x, y, 1.0)
    shrunk = {C: fit_nonnegative_logistic(x, y, C, prior=1.0) for C in (0.001, 0.01)}
    detector = ChannelSupervisedDetector(seed=args.seed, channels_from=channels, guard_from=guard).fit(clean_fit,
                                                                                                          adv_fit)
    # the guard reduced to the one channel the minimal attacks show in (the model's confidence)
    confidence = make_detector("channels", channels=("confidence",), seed=args.seed).fit(train_batch)
    confidence_guarded = ChannelSupervisedDetector(seed=args.seed, channels_from=channels,
                                                   guard_from=confidence).fit(clean_fit, adv_fit)
    combiners = {
        "guard alone (the bundle's detector)": lambda b: guard.score_samples(b),
        "Fisher, all channels": lambda b: features(b).sum(1),
        "min-p, all channels": lambda b: features(b).max(1),
        "logistic regression, unconstrained": lambda b: unconstrained.decision_function(features(b)),
        "logistic regression, w >= 0": lambda b: features(b) @ w_nonneg + b_nonneg,
        **{f"w >= 0, shrunk towards 1 (C = {C})": (lambda b, w=w, c=c: features(b) @ w + c)
           for C, (w, c) in shrunk.items()},
        "channels-supervised (w >= 0, min-p with the guard)": lambda b: detector.score_samples(b),
        "w >= 0, min-p with the confidence channel alone": lambda b: confidence_guarded.score_samples(b),
    }
    rows = {}
    print(f"validation images only: {len(clean_fit)} clean + {len(adv_fit)} adversarial (FGSM, PGD) for training; "
          f"held out: {len(heldout)} images; channels {channels.channels_}")
    print(f"{'combination':<52} " + " ".join(f"{a:>8}" for a in HELD_OUT))
    for name, score in combiners.items():
        aurocs = {}
        for attack, (clean, adv) in tests.items():
            labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
            aurocs[attack] = float(roc_auc_score(labels, np.r_[score(clean), score(adv)]))
        rows[name] = aurocs
        print(f"{name:<52} " + " ".join(f"{aurocs[a]:>8.3f}" for a in HELD_OUT))
    weights = {"logistic regression, w >= 0": dict(zip(channels.channels_, map(float, w_nonneg))),
               "channels-supervised": detector.channel_weights()}
    print("non-negative weights:", {k: round(v, 2) for k, v in weights["logistic regression, w >= 0"].items()})
    print(f"wall time {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "split": "validation only", "seed": args.seed, "seen_attacks": list(SEEN),
            "training_rows": {"clean": len(clean_fit), "adversarial": len(adv_fit)},
            "heldout_images": len(heldout),
            "heldout_successes": {a: len(adv) for a, (_, adv) in tests.items()},
            "channels": list(channels.channels_), "auroc": rows, "weights": weights}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
