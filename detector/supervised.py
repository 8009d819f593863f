"""Supervised path detector (as CDRP, Wang et al. CVPR 2018).

A scikit-learn logistic regression on path features, trained with clean
images against adversarial examples of known attacks.  The fitted model is
kept as plain arrays (scaler mean/scale, coefficients, intercept), so it
saves to safetensors and scores without scikit-learn objects or pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .paths import PathBatch
from .profile import PathProfile, confidence_features


def supervised_features(profile: PathProfile, batch: PathBatch) -> np.ndarray:
    """Per-layer path evidence, confidence, and the raw gate logits."""
    feats = torch.cat([profile.layer_features(batch), confidence_features(batch.logits), batch.gate_logits], 1)
    return feats.double().numpy()


@dataclass
class LinearScorer:
    """Standardise, then a linear decision function (larger = adversarial)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, C: float = 1.0, seed: int = 0) -> "LinearScorer":
        if len(np.unique(labels)) != 2:
            raise ValueError("supervised training needs both clean (0) and adversarial (1) examples")
        scaler = StandardScaler().fit(features)
        model = LogisticRegression(C=C, max_iter=5000, random_state=seed)
        model.fit(scaler.transform(features), labels)
        return cls(scaler.mean_, scaler.scale_, model.coef_[0], float(model.intercept_[0]))

    def decision(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale) @ self.coef + self.intercept

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": torch.from_numpy(self.mean), f"{prefix}.scale": torch.from_numpy(self.scale),
                f"{prefix}.coef": torch.from_numpy(self.coef),
                f"{prefix}.intercept": torch.tensor([self.intercept], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "LinearScorer":
        return cls(tensors[f"{prefix}.mean"].numpy(), tensors[f"{prefix}.scale"].numpy(),
                   tensors[f"{prefix}.coef"].numpy(), float(tensors[f"{prefix}.intercept"][0]))


@dataclass
class SupervisedPathDetector:
    profile: PathProfile
    C: float = 1.0
    seed: int = 0
    scorer: LinearScorer | None = None
    trained_on: tuple[str, ...] = ()

    def fit(self, clean: PathBatch, adversarial: PathBatch, attacks: tuple[str, ...] = ()) -> "SupervisedPathDetector":
        x = np.concatenate([supervised_features(self.profile, clean), supervised_features(self.profile, adversarial)])
        y = np.concatenate([np.zeros(len(clean.paths)), np.ones(len(adversarial.paths))])
        self.scorer = LinearScorer.fit(x, y, self.C, self.seed)
        self.trained_on = tuple(attacks)
        return self

    def score_samples(self, batch: PathBatch) -> np.ndarray:
        if self.scorer is None:
            raise RuntimeError("SupervisedPathDetector is not fitted")
        return self.scorer.decision(supervised_features(self.profile, batch))
