"""`pathguard fit`: fit the path scores, choose one, set the threshold.

1. The bundle's own train/validation split is rebuilt (same seed and
   fraction as training), so validation images were never trained on.
2. Every candidate path score (detector.scores.PATH_SCORES) is fitted on
   the clean *training* part only.
3. Ablation: every score is tried on adversarial examples (FGSM, PGD and CW
   by default) of correctly classified *validation* images; the score with
   the best mean AUROC becomes the bundle's detector.  The test split is
   not touched.
4. The threshold is the (1 - target FPR) quantile of the scores of the
   remaining clean validation images.
The detector is written into the bundle (detector.bundle.save_detector).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pathguard.attacks.generate import generate_attack_set
from pathguard.attacks.presets import PRESETS
from pathguard.detector.bundle import Bundle, load_bundle, save_detector, update_bundle_card
from pathguard.detector.data import DATASETS, ImageSet, load_dataset, train_val_split
from pathguard.detector.detectors import PATH_SCORES, PathScore, make_detector
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.paths import PathBatch, correct_mask, extract_paths, observe

from .config import DEFAULT_BUNDLE_TEXT, as_json, check, option


@dataclass
class Config:
    bundle: str = option(DEFAULT_BUNDLE_TEXT, "bundle directory to fit")
    dataset: str = option("fashion-mnist", "dataset name", choices=DATASETS)
    data_root: str | None = option(None, "dataset directory (default: the dataset's own)", kind=str)
    score: str = option("auto", "path score; auto = the ablation's winner", choices=("auto", *PATH_SCORES))
    target_fpr: float = option(0.05, "false-positive rate the threshold is calibrated for", minimum=0)
    smoothing: float = option(1.0, "Laplace smoothing of the gate on-frequencies", minimum=0)
    n_ablation: int = option(1000, "correctly classified validation images attacked for the ablation", minimum=1)
    # Strong (FGSM, PGD) and minimal (CW) attacks leave different evidence;
    # the default score must be chosen on both kinds.
    ablation_attacks: tuple = option(("fgsm", "pgd", "cw"), "attacks of the ablation", choices=tuple(PRESETS))
    seed: int = option(0, "seed of the attacks")
    limit_train: int | None = option(None, "fit on the first N clean training images only", kind=int, minimum=1)
    progress: bool = option(True, "progress bars")


def split_of(bundle: Bundle, train: ImageSet) -> tuple[ImageSet, ImageSet]:
    """The bundle's training/validation split of ``train``."""
    cfg = bundle.training.get("config", {})
    seed, fraction = cfg.get("seed", 0), cfg.get("val_fraction", 0.1)
    n = cfg.get("limit_train") or len(train)
    train_idx, val_idx = train_val_split(min(n, len(train)), fraction, seed)
    return train.subset(train_idx), train.subset(val_idx)


def ablation(candidates: dict[str, PathScore], clean: PathBatch, adversarial: dict) -> dict:
    """AUROC of every candidate on each validation attack (successful
    examples against their clean originals)."""
    results = {}
    for name, detector in candidates.items():
        neg_all = detector.score_samples(clean)
        per_attack = {}
        for attack, (success, adv_batch) in adversarial.items():
            pos = detector.score_samples(adv_batch)[success]
            per_attack[attack] = detection_metrics(neg_all[success], pos)["auroc"]
        results[name] = {"auroc": per_attack, "mean_auroc": float(np.mean(list(per_attack.values())))}
    return results


def _attack_batches(model, images: ImageSet, cfg: Config) -> dict:
    out = {}
    for name in cfg.ablation_attacks:
        attack_set = generate_attack_set(model, images.images, images.labels, name, seed=cfg.seed,
                                         progress=cfg.progress)
        out[name] = (attack_set.success.numpy(), extract_paths(model, attack_set.adversarial))
    return out


def fit_bundle(cfg: Config) -> dict:
    check(cfg)
    started = time.time()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle)
    model = bundle.decoupled
    train, val = split_of(bundle, load_dataset(cfg.dataset, "train", cfg.data_root))
    if cfg.limit_train:
        train = train.head(cfg.limit_train)
    train_batch = observe(model, train.images)
    names = PATH_SCORES if cfg.score == "auto" else (cfg.score,)
    candidates = {name: make_detector(name, target_fpr=cfg.target_fpr, smoothing=cfg.smoothing).fit(train_batch)
                  for name in names}

    ablation_idx = torch.nonzero(correct_mask(model, val.images, val.labels)).flatten()[:cfg.n_ablation]
    ablation_set = val.subset(ablation_idx)
    rest = torch.ones(len(val), dtype=torch.bool)
    rest[ablation_idx] = False
    calibration = val.subset(torch.nonzero(rest).flatten())

    table = ablation(candidates, observe(model, ablation_set.images), _attack_batches(model, ablation_set, cfg))
    chosen = max(table, key=lambda s: table[s]["mean_auroc"]) if cfg.score == "auto" else cfg.score
    detector = candidates[chosen].calibrate(observe(model, calibration.images))

    summary = {
        "fitted_on": {"clean_train_images": len(train), "dataset": cfg.dataset},
        "calibration": {"clean_validation_images": len(calibration), "target_fpr": cfg.target_fpr},
        "ablation": {"validation_images": len(ablation_set), "attacks": list(cfg.ablation_attacks),
                     "seed": cfg.seed, "results": table, "chosen": chosen, "rule": "best mean AUROC"},
        "fit_config": as_json(cfg),
        "wall_seconds": time.time() - started,
    }
    save_detector(bundle.path, detector, summary)
    update_bundle_card(bundle.path, {"detector": {"score": chosen, "threshold": detector.threshold_,
                                                  "target_fpr": cfg.target_fpr, "ablation": table}})
    return {"score": chosen, "threshold": detector.threshold_, **summary}


def run(cfg: Config) -> dict:
    result = fit_bundle(cfg)
    print("ablation on validation attacks (AUROC):")
    for score, row in sorted(result["ablation"]["results"].items(), key=lambda kv: -kv[1]["mean_auroc"]):
        per = ", ".join(f"{a}={v:.4f}" for a, v in row["auroc"].items())
        print(f"  {score:18s} mean={row['mean_auroc']:.4f}  {per}")
    print(f"chosen score: {result['score']}; threshold {result['threshold']:.6g} "
          f"(target FPR {cfg.target_fpr}) written to {cfg.bundle}")
    return result
