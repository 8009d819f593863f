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
from pathguard.attacks.generate import generate_attack_set
from pathguard.detector.bundle import Bundle, load_bundle
from pathguard.detector.data import ImageSet
from pathguard.detector.paths import observe
from pathguard.detector.provenance import ChannelScore
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

    def attacked(self, attacks: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per attack preset: (success mask over the pool, log p-values of the
        successful adversarial examples)."""
        out = {}
        for attack in attacks:
            aset = generate_attack_set(self.bundle.decoupled, self.pool.images, self.pool.labels, attack,
                                       seed=self.seed, progress=False)
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


def write_json(path: str | None, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made), if given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written to {path}")
