"""Path scores and the PathDetector (larger score = more suspicious).

Scores, all computed from one PathBatch and the clean profile:

  bernoulli        sum over gates of the Bernoulli NLL of the path under
                   p_(predicted class)
  jaccard          1 - mean per-layer Jaccard similarity to the predicted
                   class's effective path (Qiu et al., CVPR 2019)
  logit-gauss      squared Mahalanobis distance of the gate logits to the
                   predicted class mean (tied covariance)
  layer-gauss      a one-class Gaussian (scikit-learn's Ledoit-Wolf
                   covariance) over the per-layer path features
  layer-gauss-conf the same over the per-layer path features plus the
                   model's confidence (-log max softmax, logit margin)
  logit-gauss-conf logit-gauss and -log max softmax, each standardised by
                   its mean and std on the clean training images, summed
  logit-gauss-max  the larger of those two standardised scores

The two last ones exist because the evidence is complementary: strong
attacks (PGD) leave confident predictions on paths far from their class,
minimal ones (CW) leave paths near the class but unsure predictions.

The default is picked by ``pathguard fit``'s ablation on a validation split
(never the test split).  The API follows scikit-learn: ``fit`` on clean
paths, ``score_samples``, ``predict`` against the stored threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from .paths import PathBatch
from .profile import PathProfile, confidence_features

SCORES = ("bernoulli", "jaccard", "logit-gauss", "layer-gauss", "layer-gauss-conf", "logit-gauss-conf",
          "logit-gauss-max")


@dataclass
class GaussianOneClass:
    """One-class model: squared Mahalanobis distance to the clean mean under
    a shrunk covariance.  Kept as two tensors so it saves without pickle."""

    location: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> "GaussianOneClass":
        model = LedoitWolf().fit(features.double().numpy())
        return cls(torch.from_numpy(model.location_).float(), torch.from_numpy(model.precision_).float())

    def score(self, features: torch.Tensor) -> torch.Tensor:
        d = features.double() - self.location.double()  # float64: see PathProfile.logit_distance
        return ((d @ self.precision.double()) * d).sum(1)


@dataclass
class PathDetector:
    """Unsupervised detector on calculation paths.

    Parameters are validated on construction; everything learnt lives in
    ``profile``, ``one_class`` and ``threshold`` (set by fit/calibrate).
    """

    score: str = "layer-gauss-conf"
    target_fpr: float = 0.05
    smoothing: float = 1.0
    profile: PathProfile | None = None
    one_class: dict[str, GaussianOneClass] = field(default_factory=dict)
    threshold: float | None = None
    # mean and std of (logit-gauss, -log max softmax) on the clean fit data
    standardise: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {SCORES}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if self.smoothing <= 0:
            raise ValueError(f"smoothing must be > 0, got {self.smoothing}")

    # --------------------------------------------------------------- fit

    def fit(self, clean: PathBatch, widths: list[int], num_classes: int) -> "PathDetector":
        """Fit the profile and every one-class model on clean paths."""
        self.profile = PathProfile.fit(clean, widths, num_classes, self.smoothing)
        feats = self.profile.layer_features(clean)
        self.one_class = {
            "layer-gauss": GaussianOneClass.fit(feats),
            "layer-gauss-conf": GaussianOneClass.fit(torch.cat([feats, confidence_features(clean.logits)], 1)),
        }
        parts = self._logit_and_confidence(clean)
        self.standardise = torch.stack([parts.mean(0), parts.std(0).clamp_min(1e-6)]).float()
        self.threshold = None
        return self

    def _logit_and_confidence(self, batch: PathBatch) -> torch.Tensor:
        """(N, 2): logit-gauss distance and -log max softmax."""
        distance = self.profile.logit_distance(batch.gate_logits, batch.predictions)
        return torch.stack([distance, confidence_features(batch.logits)[:, 0].double()], 1)

    def calibrate(self, held_out_clean: PathBatch) -> "PathDetector":
        """Threshold = the (1 - target_fpr) quantile of held-out clean scores."""
        scores = self.score_samples(held_out_clean)
        self.threshold = float(np.quantile(scores, 1.0 - self.target_fpr, method="higher"))
        return self

    def with_score(self, score: str) -> "PathDetector":
        """The same fitted profile with another score (threshold unset)."""
        return PathDetector(score, self.target_fpr, self.smoothing, self.profile, self.one_class, None,
                            self.standardise)

    # ------------------------------------------------------------- score

    def _require_fitted(self) -> PathProfile:
        if self.profile is None:
            raise RuntimeError("PathDetector is not fitted: call fit() or load a fitted profile")
        return self.profile

    def score_samples(self, batch: PathBatch) -> np.ndarray:
        return self.score_tensor(batch).double().numpy()

    def score_tensor(self, batch: PathBatch) -> torch.Tensor:
        profile = self._require_fitted()
        pred = batch.predictions
        if self.score == "bernoulli":
            return profile.layer_nll(batch.paths, pred).double() @ torch.tensor(profile.widths, dtype=torch.float64)
        if self.score == "jaccard":
            return 1 - profile.layer_jaccard(batch.paths, pred).mean(1)
        if self.score == "logit-gauss":
            return profile.logit_distance(batch.gate_logits, pred)
        if self.score in ("logit-gauss-conf", "logit-gauss-max"):
            z = (self._logit_and_confidence(batch) - self.standardise[0].double()) / self.standardise[1].double()
            return z.sum(1) if self.score == "logit-gauss-conf" else z.max(1).values
        feats = profile.layer_features(batch)
        if self.score == "layer-gauss-conf":
            feats = torch.cat([feats, confidence_features(batch.logits)], 1)
        return self.one_class[self.score].score(feats)

    def predict(self, batch: PathBatch) -> np.ndarray:
        """True where the score exceeds the stored threshold (flagged)."""
        if self.threshold is None:
            raise RuntimeError("no threshold: call calibrate() first")
        return self.score_samples(batch) > self.threshold

    def layer_deviations(self, batch: PathBatch) -> np.ndarray:
        """(N, L): 1 - Jaccard similarity of each layer's path to the
        predicted class path; 0 = the layer follows its class exactly."""
        profile = self._require_fitted()
        return (1 - profile.layer_jaccard(batch.paths, batch.predictions)).double().numpy()

    # ----------------------------------------------------------- storage

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self._require_fitted().to_tensors()
        for name, model in self.one_class.items():
            tensors[f"one_class.{name}.location"] = model.location
            tensors[f"one_class.{name}.precision"] = model.precision
        if self.standardise is not None:
            tensors["standardise"] = self.standardise
        return tensors

    def config(self) -> dict:
        return {"score": self.score, "target_fpr": self.target_fpr, "smoothing": self.smoothing,
                "threshold": self.threshold}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "PathDetector":
        one_class = {}
        for name in ("layer-gauss", "layer-gauss-conf"):
            key = f"one_class.{name}."
            if key + "location" in tensors:
                one_class[name] = GaussianOneClass(tensors[key + "location"], tensors[key + "precision"])
        return cls(config["score"], config["target_fpr"], config["smoothing"],
                   PathProfile.from_tensors(tensors), one_class, config.get("threshold"), tensors.get("standardise"))
