"""`pathguard fit`: build the path profile, choose the score, set the threshold.

1. The bundle's own train/validation split is rebuilt (same seed and
   fraction as training), so validation images were never trained on.
2. The profile is fitted on the clean *training* part only.
3. Ablation: every score is tried on adversarial examples (FGSM and PGD by
   default) of correctly classified *validation* images; the score with the
   best mean AUROC becomes the default.  The test split is not touched.
4. The threshold is the (1 - target FPR) quantile of the scores of the
   remaining clean validation images.
The detector is written into the bundle (profile.safetensors +
profile.json) and the manifest refreshed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import ArtifactError, atomic_save_tensors, atomic_write_json, load_tensors, read_json, write_manifest
from .bundle import DEFAULT_BUNDLE, Bundle, load_bundle, update_bundle_card
from .data import ImageSet, load_dataset, train_val_split
from .metrics import detection_metrics
from .paths import extract_paths
from .profile import PROFILE_VERSION, ProfileMismatch
from .scores import SCORES, PathDetector

PROFILE_TENSORS = "profile.safetensors"
PROFILE_CONFIG = "profile.json"


@dataclass
class FitConfig:
    bundle: str = str(DEFAULT_BUNDLE)
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    score: str = "auto"  # "auto" = the ablation's winner
    target_fpr: float = 0.05
    smoothing: float = 1.0
    n_ablation: int = 1000
    # Strong (FGSM, PGD) and minimal (CW) attacks leave different evidence;
    # the default score must be chosen on both kinds.
    ablation_attacks: tuple = ("fgsm", "pgd", "cw")
    seed: int = 0
    limit_train: int | None = None
    progress: bool = True


def split_of(bundle: Bundle, train: ImageSet) -> tuple[ImageSet, ImageSet]:
    """The bundle's training/validation split of ``train``."""
    cfg = bundle.training.get("config", {})
    seed, fraction = cfg.get("seed", 0), cfg.get("val_fraction", 0.1)
    n = cfg.get("limit_train") or len(train)
    train_idx, val_idx = train_val_split(min(n, len(train)), fraction, seed)
    return train.subset(train_idx), train.subset(val_idx)


def save_detector(bundle_path: str | Path, detector: PathDetector, extra: dict) -> None:
    bundle_path = Path(bundle_path)
    atomic_save_tensors(bundle_path / PROFILE_TENSORS, detector.to_tensors())
    atomic_write_json(bundle_path / PROFILE_CONFIG, {
        "version": PROFILE_VERSION, **detector.config(), "widths": detector.profile.widths,
        "num_classes": detector.profile.num_classes, **extra,
    })
    write_manifest(bundle_path)


def load_detector(bundle: Bundle) -> PathDetector:
    """The bundle's fitted detector; refuses a profile of another model."""
    if not bundle.has_file(PROFILE_CONFIG):
        raise ArtifactError(f"{bundle.path}: no profile; run `pathguard fit --bundle {bundle.path}` first")
    if bundle.verified_files and not {PROFILE_CONFIG, PROFILE_TENSORS} <= bundle.verified_files:
        raise ArtifactError(f"{bundle.path}: profile files are not listed in the manifest; refusing to load them")
    config = read_json(bundle.path / PROFILE_CONFIG)
    if config.get("version") != PROFILE_VERSION:
        raise ArtifactError(f"{bundle.path / PROFILE_CONFIG}: unsupported profile version {config.get('version')!r}")
    try:
        detector = PathDetector.from_saved(config, load_tensors(bundle.path / PROFILE_TENSORS))
        detector.profile.check_fits(bundle.decoupled.gated_widths, bundle.arch.num_classes)
    except (ProfileMismatch, KeyError, ValueError) as exc:
        raise ArtifactError(f"{bundle.path}: profile does not match the model: {exc}") from exc
    return detector


def ablation(detector: PathDetector, clean_batch, adversarial: dict) -> dict:
    """AUROC of every score on each validation attack (successful examples
    against their clean originals)."""
    results = {}
    for score in SCORES:
        candidate = detector.with_score(score)
        per_attack = {}
        for name, (success, adv_batch) in adversarial.items():
            neg = candidate.score_samples(clean_batch)[success]
            pos = candidate.score_samples(adv_batch)[success]
            per_attack[name] = detection_metrics(neg, pos)["auroc"]
        results[score] = {"auroc": per_attack, "mean_auroc": float(np.mean(list(per_attack.values())))}
    return results


def fit_bundle(cfg: FitConfig) -> dict:
    from pathguard.attacks.cli import select_correct
    from pathguard.attacks.generate import generate_attack_set

    started = time.time()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle)
    model = bundle.decoupled
    full = load_dataset(cfg.dataset, "train", cfg.data_root)
    train, val = split_of(bundle, full)
    if cfg.limit_train:
        train = train.head(cfg.limit_train)

    detector = PathDetector(cfg.score if cfg.score != "auto" else "layer-gauss-conf", cfg.target_fpr, cfg.smoothing)
    detector.fit(extract_paths(model, train.images), model.gated_widths, bundle.arch.num_classes)

    ablation_idx = select_correct(model, val.images, val.labels, cfg.n_ablation)
    ablation_set = val.subset(ablation_idx)
    rest = torch.ones(len(val), dtype=torch.bool)
    rest[ablation_idx] = False
    calibration = val.subset(torch.nonzero(rest).flatten())

    clean_batch = extract_paths(model, ablation_set.images)
    adversarial = {}
    for name in cfg.ablation_attacks:
        attack_set = generate_attack_set(model, ablation_set.images, ablation_set.labels, name,
                                         seed=cfg.seed, progress=cfg.progress)
        adversarial[name] = (attack_set.success.numpy(), extract_paths(model, attack_set.adversarial))
    table = ablation(detector, clean_batch, adversarial)
    chosen = max(table, key=lambda s: table[s]["mean_auroc"]) if cfg.score == "auto" else cfg.score
    detector = detector.with_score(chosen).calibrate(extract_paths(model, calibration.images))

    summary = {
        "fitted_on": {"clean_train_images": len(train), "dataset": cfg.dataset},
        "calibration": {"clean_validation_images": len(calibration), "target_fpr": cfg.target_fpr},
        "ablation": {"validation_images": len(ablation_set), "attacks": list(cfg.ablation_attacks),
                     "seed": cfg.seed, "results": table, "chosen": chosen, "rule": "best mean AUROC"},
        "fit_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "wall_seconds": time.time() - started,
    }
    save_detector(bundle.path, detector, summary)
    update_bundle_card(bundle.path, {"detector": {"score": chosen, "threshold": detector.threshold,
                                                  "target_fpr": cfg.target_fpr, "ablation": table}})
    return {"score": chosen, "threshold": detector.threshold, **summary}
