"""`pathguard fit`: fit the path scores, choose one, set the threshold.

1. The bundle's own data and train/validation split are rebuilt (same
   data, seed and fraction as training), so validation images were never
   trained on.
2. Every candidate path score (detector.detectors.PATH_SCORES: the first
   path scores and detector v2's channel scores) is fitted on the clean
   *training* part only, with its true labels (channel scores' class
   evidence learns from them; the path profiles use predicted classes).
3. The validation part is cut, class-stratified and seeded, into two
   disjoint splits: the *ablation* pool and the *calibration* split.
   Ablation: every score is tried on adversarial examples (FGSM, PGD and CW
   by default) of correctly classified images of the pool; the score with
   the best mean AUROC becomes the bundle's detector.
4. The threshold comes from the scores of the clean calibration images:
   by default (--fpr-confidence 0.95) the lowest one whose FPR has a 95%
   Clopper-Pearson upper bound at or below the target FPR; with
   --fpr-confidence 0 their plain (1 - target FPR) quantile
   (detector/calibration.py).  Fewer than MIN_CALIBRATION correctly
   classified images there is refused.
5. The threshold's false-positive rate is then checked on the test split
   (reported, never used for a choice) and printed.
The detector is written into the bundle (detector.bundle.save_detector).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from pathguard.attacks.generate import generate_attack_set
from pathguard.attacks.presets import PRESETS
from pathguard.detector.artifacts import read_json
from pathguard.detector.bundle import (
    DETECTOR_CONFIG, Bundle, load_bundle, load_detector, save_detector, update_bundle_card,
)
from pathguard.detector.calibration import allowed_exceedances, calibration_facts
from pathguard.detector.data import ImageSet, load_unlabelled_images
from pathguard.detector.detectors import DETECTORS, PATH_SCORES, PathScore, make_detector
from pathguard.detector.devices import resolve_device
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.paths import PathBatch, correct_mask, observe
from pathguard.detector.provenance import COMBINE_RULES, parse_channel, shared_classifier_fits
from pathguard.detector.splits import SplitError, class_counts, stratified_split

from .config import BundleOptions, as_json, check, device_option, option
from .data import data_spec, load_for, train_validation

# The ablation's attacks when none are given: reporting on a fixed score, or
# choosing the score (Config.ablation_attacks).
FIXED_SCORE_ATTACKS = ("fgsm", "bim")
AUTO_SCORE_ATTACKS = ("fgsm", "pgd", "cw")

# A threshold is a (1 - FPR) quantile: with fewer clean images its FPR is
# too uncertain (at 5% and 250 images the standard error is 1.4 points).
MIN_CALIBRATION = 250


@dataclass
class Config(BundleOptions):
    device: str = device_option()
    # The default is the shipped bundle's score, chosen on its validation split
    # (scripts/fusion_validation_check.py); "auto" fits every score and keeps
    # the one with the best mean validation AUROC over the ablation attacks.
    score: str = option("fusion-moments", "path score; auto = the ablation's winner over every score; "
                        "channels = the channels named by --channels", choices=("auto", *PATH_SCORES, "channels"))
    # A channel score of the user's own composition (docs/method.md lists the
    # channel names), e.g. --score channels --channels confidence value:moments0 path
    channels: tuple = option((), "channels of --score channels (e.g. value:moments0 confidence path)", kind=str)
    combine: str = option("min-p", "p-value combination of --score channels", choices=COMBINE_RULES)
    target_fpr: float = option(0.05, "false-positive rate the threshold is calibrated for", minimum=0)
    # 0 takes the plain quantile (the FPR is the target only on average over
    # calibration samples); 0.95 holds it at or below the target with 95%
    # confidence (detector/calibration.py).
    fpr_confidence: float = option(0.95, "confidence that the threshold's clean FPR is at most --target-fpr "
                                   "(0 = the plain quantile)", minimum=0)
    smoothing: float = option(1.0, "Laplace smoothing of the gate on-frequencies", minimum=0)
    n_ablation: int = option(1000, "correctly classified validation images attacked for the ablation", minimum=1)
    # With a fixed score the ablation only reports (FGSM and BIM, the shipped
    # score's validation check).  --score auto chooses on it, so by default
    # on strong and minimal attacks (FGSM, PGD, CW): they leave different
    # evidence, and the winner must be chosen on both kinds.
    ablation_attacks: tuple = option(
        (), f"attacks of the ablation (default: {' '.join(FIXED_SCORE_ATTACKS)} with a fixed --score, "
            f"{' '.join(AUTO_SCORE_ATTACKS)} with --score auto)", choices=tuple(PRESETS), kind=str)
    seed: int = option(0, "seed of the attacks")
    limit_train: int | None = option(None, "fit on the first N clean training images only", kind=int, minimum=1)
    progress: bool = option(True, "progress bars")
    # Another operating point without refitting: the fitted detector is kept,
    # only the threshold is set again (--target-fpr, --fpr-confidence).
    calibrate_only: bool = option(False, "keep the bundle's fitted detector and only set its threshold again "
                                  "(--target-fpr, --fpr-confidence) on the calibration split its fit used")
    # The threshold's promise holds for images like its calibration images: a
    # deployment whose clean traffic differs from the validation split sets it
    # on its own clean images instead.
    calibration_images: str | None = option(None, "with --calibrate-only: set the threshold on the clean images "
                                            "under this folder (searched recursively, no labels) instead",
                                            kind=str)


def validation_splits(model, val: ImageSet, n_ablation: int, seed: int) -> tuple[ImageSet, ImageSet, list[str]]:
    """(ablation images, calibration images, notes): disjoint, stratified,
    seeded.  The ablation pool is sized for n_ablation correctly classified
    images (at most half the validation part); the rest calibrates."""
    notes = []
    correct = correct_mask(model, val.images, val.labels)
    accuracy = max(float(correct.float().mean()), 1e-3)
    pool = min(int(np.ceil(n_ablation / accuracy / 0.95)), len(val) // 2)
    parts = stratified_split(val.labels, {"ablation": pool, "calibration": len(val) - pool}, seed)
    calibration = val.subset(parts["calibration"])
    n_ok = int(correct[parts["calibration"]].sum())
    if n_ok < MIN_CALIBRATION:
        raise SplitError(
            f"calibration split: only {n_ok} correctly classified clean images (of {len(calibration)}), at least "
            f"{MIN_CALIBRATION} are needed for a {MIN_CALIBRATION}-image threshold; train with more data or a "
            f"larger --val-fraction (the validation part has {len(val)} images)")
    pool_ok = parts["ablation"][correct[parts["ablation"]]]
    if len(pool_ok) < n_ablation:
        notes.append(f"ablation: {len(pool_ok)} correctly classified validation images, not the "
                     f"{n_ablation} asked for (the rest of the validation part calibrates the threshold)")
    ablation_set = val.subset(pool_ok[:n_ablation])
    return ablation_set, calibration, notes


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


def _attack_batches(model, images: ImageSet, cfg: Config, blocks: bool) -> dict:
    out = {}
    for name in cfg.ablation_attacks:
        attack_set = generate_attack_set(model, images.images, images.labels, name, seed=cfg.seed,
                                         progress=cfg.progress)
        out[name] = (attack_set.success.numpy(), observe(model, attack_set.adversarial, blocks=blocks))
    return out


def ablation_attacks(cfg: Config) -> tuple:
    """The ablation's attacks: as given, else the default for the score
    choice (``FIXED_SCORE_ATTACKS`` / ``AUTO_SCORE_ATTACKS``)."""
    if cfg.ablation_attacks:
        return tuple(cfg.ablation_attacks)
    return AUTO_SCORE_ATTACKS if cfg.score == "auto" else FIXED_SCORE_ATTACKS


def check_options(cfg: Config) -> None:
    """The options' ranges (config.check) and how they fit together."""
    check(cfg)
    if not 0.0 < cfg.target_fpr < 1.0:
        raise ValueError(f"target-fpr: must be in (0, 1), got {cfg.target_fpr}")
    if not 0.0 <= cfg.fpr_confidence < 1.0:
        raise ValueError(f"fpr-confidence: must be in [0, 1), got {cfg.fpr_confidence}")
    if cfg.calibration_images and not cfg.calibrate_only:
        raise ValueError("--calibration-images sets the threshold of a fitted detector: add --calibrate-only")
    if cfg.calibrate_only and (cfg.score != Config.score or cfg.channels):
        raise ValueError("--calibrate-only keeps the bundle's fitted detector: drop --score / --channels, or "
                         "fit again without --calibrate-only")
    check_channels(cfg)


def check_channels(cfg: Config) -> None:
    """--channels names the channels of --score channels, and only those."""
    if cfg.score == "channels" and not cfg.channels:
        raise ValueError("--score channels needs --channels, e.g. --channels value:moments0 confidence path")
    if cfg.channels and cfg.score != "channels":
        raise ValueError(f"--channels is for --score channels; --score {cfg.score} has its own channels")
    for spec in cfg.channels:
        parse_channel(spec)


def candidate_params(cfg: Config, name: str) -> dict:
    """The constructor parameters of candidate ``name``."""
    params = {"target_fpr": cfg.target_fpr, "smoothing": cfg.smoothing}
    if name == "channels":
        params.update(channels=tuple(cfg.channels), combine=cfg.combine)
    return params


def fit_bundle(cfg: Config) -> dict:
    check_options(cfg)
    if cfg.calibrate_only:
        return recalibrate_bundle(cfg)
    # the attacks that run are recorded (fit_config), not the empty "default"
    cfg = dataclasses.replace(cfg, ablation_attacks=ablation_attacks(cfg))
    started = time.time()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle).to(resolve_device(cfg.device))
    model = bundle.decoupled
    spec = data_spec(bundle, cfg.dataset, cfg.data_root)
    train, val = train_validation(bundle, spec)
    if cfg.limit_train:
        train = train.head(cfg.limit_train)
    ablation_set, calibration, notes = _splits(cfg, model, val, cfg.n_ablation, cfg.seed)
    names = PATH_SCORES if cfg.score == "auto" else (cfg.score,)
    # every block's features only when a candidate reads them (detector v2's channels)
    blocks = any("blocks" in DETECTORS[name].requires for name in names)
    train_batch = observe(model, train.images, labels=train.labels, blocks=blocks)
    candidates = {}
    with shared_classifier_fits():  # the scores' identical per-layer classifiers are fitted once
        for name in names:
            started_fit = time.time()
            candidates[name] = make_detector(name, **candidate_params(cfg, name)).fit(train_batch)
            if cfg.progress:
                print(f"fitted {name} in {time.time() - started_fit:.1f} s")
    del train_batch
    table = ablation(candidates, observe(model, ablation_set.images, blocks=blocks),
                     _attack_batches(model, ablation_set, cfg, blocks))
    chosen = max(table, key=lambda s: table[s]["mean_auroc"]) if cfg.score == "auto" else cfg.score
    detector, calibration_summary = _calibrate(candidates[chosen], model, calibration.images, cfg, calibration.labels)
    summary = {
        "fitted_on": {"clean_train_images": len(train), "data": spec.to_json()},
        "calibration": calibration_summary,
        "ablation": {"validation_images": len(ablation_set), "attacks": list(cfg.ablation_attacks),
                     "seed": cfg.seed, "results": table, "chosen": chosen, "rule": "best mean AUROC"},
        "threshold_check": threshold_check(bundle, spec, detector),
        "notes": notes,
        "fit_config": as_json(cfg),
        "wall_seconds": time.time() - started,
    }
    save_detector(bundle.path, detector, summary)
    _update_card(bundle, detector, summary, table)
    return {"score": chosen, "threshold": detector.threshold_, **summary}


def recalibrate_bundle(cfg: Config) -> dict:
    """--calibrate-only: the bundle's fitted detector kept as it is, only its
    threshold set again (--target-fpr, --fpr-confidence) on the calibration
    split its fit used (rebuilt from the recorded seed and ablation size)."""
    started = time.time()
    bundle = load_bundle(cfg.bundle).to(resolve_device(cfg.device))
    detector = load_detector(bundle)
    saved = read_json(bundle.path / DETECTOR_CONFIG)
    fitted = saved.get("fit_config") or {}
    spec = data_spec(bundle, cfg.dataset, cfg.data_root)
    if cfg.calibration_images:
        images, notes = _own_calibration_images(cfg, bundle, spec)
        labels, source = None, {"folder": cfg.calibration_images, "notes": notes}
    else:
        _, val = train_validation(bundle, spec)
        _, calibration, notes = _splits(cfg, bundle.decoupled, val, fitted.get("n_ablation", cfg.n_ablation),
                                        fitted.get("seed", cfg.seed))
        images, labels, source = calibration.images, calibration.labels, None
    previous = {"threshold": detector.threshold_, "target_fpr": detector.target_fpr,
                "calibration": {k: v for k, v in (saved.get("calibration") or {}).items() if k != "per_class"}}
    detector.target_fpr = cfg.target_fpr
    detector, calibration_summary = _calibrate(detector, bundle.decoupled, images, cfg, labels, source)
    summary = {k: v for k, v in saved.items() if k not in ("version", *detector.config())}
    summary.update(calibration=calibration_summary, threshold_check=threshold_check(bundle, spec, detector),
                   recalibrated={"previous": previous, "config": as_json(cfg), "notes": notes,
                                 "wall_seconds": time.time() - started})
    save_detector(bundle.path, detector, summary)
    _update_card(bundle, detector, summary, (summary.get("ablation") or {}).get("results"))
    return {"score": detector.name, "threshold": detector.threshold_, **summary}


def _splits(cfg: Config, model, val: ImageSet, n_ablation: int, seed: int) -> tuple[ImageSet, ImageSet, list[str]]:
    """validation_splits, refusing a calibration split too small for the
    --fpr-confidence bound before anything is fitted; prints the notes."""
    ablation_set, calibration, notes = validation_splits(model, val, n_ablation, seed)
    _require_bound(cfg, len(calibration), "calibration split")
    for note in notes:
        print(f"note: {note}")
    return ablation_set, calibration, notes


def _require_bound(cfg: Config, n: int, what: str) -> None:
    """Refuse ``n`` calibration images too few for the --fpr-confidence bound."""
    if cfg.fpr_confidence:
        try:
            allowed_exceedances(n, cfg.target_fpr, cfg.fpr_confidence)
        except ValueError as err:
            raise SplitError(f"{what}: {err}") from None


def _own_calibration_images(cfg: Config, bundle: Bundle, spec) -> tuple[torch.Tensor, list[str]]:
    """--calibration-images: the folder's images at the model's input shape
    (converted as the training data was: grey or colour, resized by the data's
    rule), refused when too few to calibrate on."""
    arch = bundle.decoupled.arch
    images, notes = load_unlabelled_images(cfg.calibration_images, arch.in_channels,
                                           (arch.image_size, arch.image_size), spec.resize)
    if len(images) < MIN_CALIBRATION:
        raise SplitError(f"--calibration-images: {len(images)} images under {cfg.calibration_images}, at least "
                         f"{MIN_CALIBRATION} are needed for a threshold")
    _require_bound(cfg, len(images), "--calibration-images")
    for note in notes:
        print(f"note: {cfg.calibration_images}: {note}")
    return images, notes


def _calibrate(detector: PathScore, model, images: torch.Tensor, cfg: Config, labels: torch.Tensor | None = None,
               source: dict | None = None) -> tuple[PathScore, dict]:
    """The detector's threshold set on clean calibration images, and what
    it means there (profile.json's "calibration"): the validation split's
    (``labels`` given, counted per class) or a folder of the user's own
    (``source``)."""
    scores = detector.score_samples(detector.observe(model, images))
    if source is not None and detector.threshold_ is not None:
        # how unlike the fit's clean images these are: a clean image scores above the old threshold
        # about target-FPR of the time when it is like them
        source = {**source, "flagged_at_previous_threshold": float(detector.flag(scores).mean())}
    detector.calibrate_scores(scores, cfg.fpr_confidence)
    facts = calibration_facts(scores, detector.threshold_, cfg.target_fpr, cfg.fpr_confidence)
    if source is not None:
        return detector, {"clean_images": len(images), "source": source, "target_fpr": cfg.target_fpr, **facts}
    return detector, {"clean_validation_images": len(images), "target_fpr": cfg.target_fpr, **facts,
                      "per_class": class_counts(labels)}


def _update_card(bundle: Bundle, detector: PathScore, summary: dict, table: dict | None) -> None:
    update_bundle_card(bundle.path, {"detector": {
        "score": detector.name, "threshold": detector.threshold_, "target_fpr": detector.target_fpr,
        "fpr_confidence": summary["calibration"]["confidence"], "ablation": table,
        "threshold_check": summary["threshold_check"]}})


def threshold_check(bundle: Bundle, spec, detector: PathScore) -> dict:
    """The stored threshold's false-positive rate on the clean test split
    (held out from everything fit chose): all images, and those the model
    classifies correctly."""
    test = load_for(bundle, spec, "test")
    batch = detector.observe(bundle.decoupled, test.images)
    flags = detector.predict(batch)
    correct = (batch.predictions == test.labels).numpy()
    return {"test_images": len(test), "fpr_all": float(flags.mean()),
            "fpr_correctly_classified": float(flags[correct].mean()) if correct.any() else None,
            "target_fpr": detector.target_fpr}


def run(cfg: Config) -> dict:
    result = fit_bundle(cfg)
    if cfg.calibrate_only:
        was = result["recalibrated"]["previous"]
        print(f"kept the fitted {result['score']}; threshold was {was['threshold']:.6g} "
              f"(target FPR {was['target_fpr']})")
    else:
        print("ablation on validation attacks (AUROC):")
        for score, row in sorted(result["ablation"]["results"].items(), key=lambda kv: -kv[1]["mean_auroc"]):
            per = ", ".join(f"{a}={v:.4f}" for a, v in row["auroc"].items())
            print(f"  {score:18s} mean={row['mean_auroc']:.4f}  {per}")
    check_ = result["threshold_check"]
    cal = result["calibration"]
    bound = (f", upper {cfg.fpr_confidence:g}-bound {cal['fpr_upper_bound']:.4f}" if cfg.fpr_confidence else "")
    label = "score" if cfg.calibrate_only else "chosen score"
    where = (f"{cal['clean_images']} clean images of {cal['source']['folder']}" if "source" in cal
             else f"{cal['clean_validation_images']} clean validation images")
    print(f"{label}: {result['score']}; threshold {result['threshold']:.6g} (target FPR {cfg.target_fpr}, "
          f"calibrated on {where}: FPR there {cal['calibration_fpr']:.4f}{bound}) written to {cfg.bundle}")
    print(f"threshold check on the {check_['test_images']} clean test images: FPR {check_['fpr_all']:.4f} "
          f"(correctly classified ones: {check_['fpr_correctly_classified']:.4f})")
    _warn_if_unlike(cal, result["recalibrated"]["previous"] if cfg.calibrate_only else None)
    return result


def _warn_if_unlike(cal: dict, previous: dict | None) -> None:
    """A folder whose clean images the old threshold flagged far beyond its
    target is unlike the data the detector was fitted on: the new threshold
    keeps the FPR promise there by letting attacks through (README,
    "Threshold with a confidence bound")."""
    flagged = (cal.get("source") or {}).get("flagged_at_previous_threshold")
    if flagged is None or flagged <= 2 * previous["target_fpr"]:
        return
    print(f"warning: the previous threshold ({previous['threshold']:.6g}) flagged {flagged:.1%} of these clean "
          f"images (target {previous['target_fpr']:.1%}): they are unlike the data the detector was fitted on, "
          f"and a threshold high enough for them lets attacks through; train and fit on such images instead "
          f"(docs/own-images.md)")
