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

from .base import Detector, register
from .paths import PathBatch
from .profile import PathProfile, confidence_features
from .scores import PathScore


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


@register
class SupervisedPathDetector(Detector):
    """Logistic regression on path evidence, clean (0) against adversarial
    (1) examples.  The path profile comes from ``profile_from`` (a fitted
    path score, e.g. the bundle's, whose profile saw all clean training
    images) or, without one, is fitted on the clean rows given to ``fit``."""

    name = "path-supervised"
    supervised = True

    def __init__(self, target_fpr: float = 0.05, C: float = 1.0, seed: int = 0, smoothing: float = 1.0,
                 profile_from: PathScore | None = None) -> None:
        super().__init__(target_fpr)
        self.C, self.seed, self.smoothing, self.profile_from = C, seed, smoothing, profile_from

    def get_params(self) -> dict:
        params = super().get_params()
        params.pop("profile_from")  # its profile is saved as fitted state
        return params

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.C <= 0 or self.smoothing <= 0:
            raise ValueError(f"C and smoothing must be > 0, got {self.C}, {self.smoothing}")
        if self.profile_from is not None and not self.profile_from.is_fitted:
            raise ValueError("profile_from must be a fitted path score")

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        self.profile_ = (self.profile_from.profile_ if self.profile_from is not None
                         else PathProfile.fit(clean, self.smoothing))
        x = np.concatenate([supervised_features(self.profile_, clean), supervised_features(self.profile_, adversarial)])
        y = np.concatenate([np.zeros(len(clean)), np.ones(len(adversarial))])
        self.scorer_ = LinearScorer.fit(x, y, self.C, self.seed)

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return torch.from_numpy(self.scorer_.decision(supervised_features(self.profile_, batch)))

    def _state(self) -> dict[str, torch.Tensor]:
        return {**self.profile_.to_tensors(), **self.scorer_.to_tensors("scorer")}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.profile_ = PathProfile.from_tensors(tensors)
        self.scorer_ = LinearScorer.from_tensors(tensors, "scorer")
