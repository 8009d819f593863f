"""What scripts/detector_v2_ablation.py and scripts/fusion_validation_check.py
share: detector v2's channels fitted as ``pathguard fit`` fits them, and their
per-channel log p-values on the validation split's ablation pool, its
calibration images and the pool's adversarial examples (never the test split).

Every channel model depends on its own layer only and all share the same fit
and reference rows, so a combination of channels is computed exactly from
the per-channel log p-values (``combine``), as a ``channels`` detector with
those channels alone would score them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pathguard.attacks.generate import METADATA_FILE, AttackSet, generate_attack_set, load_attack_set, save_attack_set
from pathguard.detector.bundle import Bundle, load_bundle
from pathguard.detector.data import ImageSet
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.natural import natural_ood
from pathguard.detector.paths import observe
from pathguard.detector.provenance import ChannelScore
from pathguard.jobs.attack_reuse import mismatches
from pathguard.jobs.data import data_spec, train_validation
from pathguard.jobs.fit import validation_splits


def combine(log_p: np.ndarray, rule: str) -> np.ndarray:
    """Fisher (-2 sum log p) or min-p (-log min p) over the columns."""
    return -2 * log_p.sum(1) if rule == "fisher" else -log_p.min(1)


@dataclass
class ValidationChannels:
    bundle: Bundle
    pool: ImageSet          # correctly classified images of the validation ablation pool
    calibration: ImageSet   # the rest of the validation part (the threshold's images)
    detector: ChannelScore
    seed: int

    def log_p(self, images: torch.Tensor) -> np.ndarray:
        """(N, channels) log p-values, columns in ``detector.channels_`` order."""
        return self.detector.channel_log_p(observe(self.bundle.decoupled, images, blocks=True)).numpy()

    def attack_set(self, attack: str, cache: str | None = None) -> AttackSet:
        """The preset ``attack`` on the pool images.  With ``cache``, the set
        saved in ``cache/<attack>`` by an earlier run is used when it is
        provably this run's (same model digest, images, labels, settings and
        seed: ``pathguard.jobs.attack_reuse.mismatches``; refused with the
        reasons otherwise), and a set made here is saved there."""
        folder = Path(cache) / attack if cache else None
        task = (self.pool.images, self.pool.labels, attack, self.seed, None)
        if folder is not None and (folder / METADATA_FILE).is_file():
            aset = load_attack_set(folder)
            problems = mismatches(aset, task, self.bundle.model_digest)
            if problems:
                raise ValueError(f"{folder}: not this run's {attack} set: " + "; ".join(problems))
            return aset
        aset = generate_attack_set(self.bundle.decoupled, self.pool.images, self.pool.labels, attack,
                                   seed=self.seed, progress=False)
        if folder is not None:
            aset.source = {"bundle": str(self.bundle.path), "bundle_digest": self.bundle.digest,
                           "model_digest": self.bundle.model_digest, "split": "validation",
                           "selection": "the validation ablation pool (scripts/channel_validation.py)"}
            save_attack_set(aset, folder)
        return aset

    def attacked(self, attacks: list[str], cache: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per attack preset: (success mask over the pool, log p-values of the
        successful adversarial examples); ``cache`` as in ``attack_set``."""
        out = {}
        for attack in attacks:
            aset = self.attack_set(attack, cache)
            ok = aset.success.numpy()
            out[attack] = (ok, self.log_p(aset.adversarial[ok]))
            print(f"{attack}: {int(ok.sum())} of {len(ok)} successful")
        return out


def fit_on_validation(bundle_path: str, channels: tuple[str, ...] | None, n: int, seed: int,
                      model_channels=None) -> ValidationChannels:
    """Load the bundle, split its validation part as ``pathguard fit`` does
    (``n`` correctly classified ablation images), and fit one ``channels``
    detector on every clean training image (true labels).  ``channels`` may
    be None when ``model_channels(n_blocks, n_gated)`` names them from the
    model's layout."""
    torch.manual_seed(seed)
    bundle = load_bundle(bundle_path)
    train, val = train_validation(bundle, data_spec(bundle))
    pool, calibration, notes = validation_splits(bundle.decoupled, val, n, seed)
    for note in notes:
        print(f"note: {note}")
    train_batch = observe(bundle.decoupled, train.images, labels=train.labels, blocks=True)
    if channels is None:
        channels = model_channels(len(train_batch.blocks), len(train_batch.widths))
    detector = ChannelScore(channels=channels, seed=seed).fit(train_batch)
    return ValidationChannels(bundle, pool, calibration, detector, seed)


SHIPPED = ("value:moments0", "confidence", "path")   # the shipped detector's channels (fusion-moments)
ATTACKS = ("fgsm", "bim", "pgd", "cw", "deepfool")


def set_name(rule: str, kept: tuple, added: tuple) -> str:
    head = ("shipped",) if kept == SHIPPED else kept
    return f"{rule}:" + "+".join(head + added)


def evaluate_candidate_sets(fitted: ValidationChannels, distances, candidates: tuple, sets: tuple,
                            cache: str | None = None) -> dict[str, dict]:
    """Channel sets made of the fitted detector's channels and candidate
    channels the detector does not have, on the validation split only.

    ``distances(images)`` gives every candidate's raw score (larger = more
    suspicious); ``sets`` are (rule, kept detector channels, added
    candidates).  Each candidate's p-values are taken against one half of
    the calibration images, each set's threshold (its 95% quantile) on the
    other half; per set: the share of clean pool images flagged, of each
    natural group built from the pool, and per attack (``ATTACKS``, the
    pool's sets, ``cache`` as in ``ValidationChannels.attack_set``) the
    AUROC against the clean originals and the share flagged."""
    calibration = fitted.calibration.images
    order = list(fitted.detector.channels_)
    half = len(calibration) // 2
    reference = distances(calibration[:half])

    def scores(images) -> dict[tuple, np.ndarray]:
        """Every set's score: the detector's channels' own log p, each candidate's against the reference half."""
        kept_log_p, raw = fitted.log_p(images), distances(images)
        log_p = {c: np.log((1 + (reference[c][None, :] >= raw[c][:, None]).sum(1)) / (half + 1))
                 for c in candidates}
        out = {}
        for rule, kept, added in sets:
            columns = np.concatenate([kept_log_p[:, [order.index(k) for k in kept]]]
                                     + [log_p[c][:, None] for c in added], 1)
            out[(rule, kept, added)] = -2 * columns.sum(1) if rule == "fisher" else -columns.min(1)
        return out

    held = scores(calibration[half:])
    thresholds = {s: float(np.quantile(held[s], 0.95, method="higher")) for s in sets}
    pool = fitted.pool
    clean = scores(pool.images)
    rows = {s: {"clean_pool_flagged": float((clean[s] > thresholds[s]).mean()), "natural": {}} for s in sets}
    natural = natural_ood(pool.images, seed=fitted.seed)
    for group, images in natural.groups.items():
        for s, v in scores(images).items():
            rows[s]["natural"][group] = float((v > thresholds[s]).mean())
    for attack in ATTACKS:
        aset = fitted.attack_set(attack, cache)
        ok = aset.success.numpy()
        for s, v in scores(aset.adversarial[ok]).items():
            metrics = detection_metrics(clean[s][ok], v, 0.05)
            rows[s][attack] = {"auroc": metrics["auroc"], "flagged": float((v > thresholds[s]).mean()),
                               "successes": int(ok.sum())}
    print(f"validation only: {len(pool)} pool images, {len(calibration)} calibration images")
    named = {}
    for s in sets:
        row = rows[s]
        row["natural_all"] = float(np.mean(list(row["natural"].values())))
        name = set_name(*s)
        named[name] = row
        attacks = "  ".join(f"{a} {row[a]['auroc']:.4f}/{row[a]['flagged']:.3f}" for a in ATTACKS)
        print(f"{name}: natural {row['natural_all']:.3f} (rotated-90 {row['natural']['rotated-90']:.3f}, "
              f"rotated-180 {row['natural']['rotated-180']:.3f}), clean pool {row['clean_pool_flagged']:.3f}\n"
              f"  AUROC/flagged {attacks}")
    return named


def write_json(path: str | None, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made), if given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {path}")
