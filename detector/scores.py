"""Path scores: unsupervised detectors on calculation paths.

Each score is a small registered ``Detector`` (base.py); all fit a
``PathProfile`` on clean paths, grouped by the model's predicted class
(docs/method.md, "Scores"):

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
                   its mean and std on the clean fit data, summed
  logit-gauss-max  the larger of those two standardised scores

The two last ones exist because the evidence is complementary: strong
attacks (PGD) leave confident predictions on paths far from their class,
minimal ones (CW) leave paths near the class but unsure predictions.
``pathguard fit`` picks the bundle's score by an ablation on a validation
split, never on the test split.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from .base import Detector, register
from .paths import PathBatch
from .profile import PathProfile, confidence_features


class GaussianOneClass:
    """One-class model: squared Mahalanobis distance to the clean mean under
    a Ledoit-Wolf shrunk covariance, kept as two tensors (no pickle)."""

    def __init__(self, location: torch.Tensor, precision: torch.Tensor) -> None:
        self.location, self.precision = location, precision

    @classmethod
    def fit(cls, features: torch.Tensor) -> "GaussianOneClass":
        model = LedoitWolf().fit(features.double().numpy())
        return cls(torch.from_numpy(model.location_).float(), torch.from_numpy(model.precision_).float())

    def score(self, features: torch.Tensor) -> torch.Tensor:
        d = features.double() - self.location.double()  # float64: see PathProfile.logit_distance
        return ((d @ self.precision.double()) * d).sum(1)


class PathScore(Detector):
    """A score read off the path profile of the predicted class.  Fitted
    state: ``profile_`` (and what a subclass adds)."""

    def __init__(self, target_fpr: float = 0.05, smoothing: float = 1.0) -> None:
        super().__init__(target_fpr)
        self.smoothing = smoothing

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.smoothing <= 0:
            raise ValueError(f"smoothing must be > 0, got {self.smoothing}")

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        self.profile_ = PathProfile.fit(clean, self.smoothing)

    def layer_deviations(self, batch: PathBatch) -> np.ndarray:
        """(N, L): 1 - Jaccard similarity of each layer's path to the
        predicted class path; 0 = the layer follows its class exactly."""
        self._require_fitted()
        return (1 - self.profile_.layer_jaccard(batch.paths, batch.predictions)).double().numpy()

    def layer_classes(self, batch: PathBatch) -> tuple[np.ndarray, np.ndarray]:
        """(classes, similarities), each (N, L): per gated layer, the class
        whose effective path is most like the image's path in that layer
        (Jaccard), and that similarity.  Detector v2's channel scores answer
        this with a classifier per layer instead (provenance.py)."""
        self._require_fitted()
        profile = self.profile_
        n = len(batch)
        sims = torch.stack([profile.layer_jaccard(batch.paths, torch.full((n,), c, dtype=torch.long))
                            for c in range(profile.num_classes)], dim=2)  # (N, L, C)
        best = sims.max(dim=2)
        return best.indices.numpy(), best.values.double().numpy()

    def evidence(self, batch: PathBatch) -> list[dict]:
        """Per image, what the service and ``pathguard explain`` report:
        ``most_deviating`` (the gated layer whose path is least like its
        class's: ``gated layer I``), ``layer_classes`` (class indices, see
        ``layer_classes``) and ``p_values`` (None: these scores have no
        channels)."""
        deviations = self.layer_deviations(batch)
        classes, _ = self.layer_classes(batch)
        worst = deviations.argmax(1)
        return [{"most_deviating": f"gated layer {int(worst[i])}", "layer_classes": classes[i].tolist(),
                 "p_values": None} for i in range(len(batch))]

    def score_and_evidence(self, batch: PathBatch) -> tuple[np.ndarray, list[dict]]:
        """``score_samples`` and ``evidence`` of one batch together (what the
        service answers; a subclass may share work between the two)."""
        return self.score_samples(batch), self.evidence(batch)

    def _state(self) -> dict[str, torch.Tensor]:
        return self.profile_.to_tensors()

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.profile_ = PathProfile.from_tensors(tensors)


@register
class BernoulliScore(PathScore):
    name = "bernoulli"

    def _score(self, batch: PathBatch) -> torch.Tensor:
        profile = self.profile_
        nll = profile.layer_nll(batch.paths, batch.predictions).double()
        return nll @ torch.tensor(profile.widths, dtype=torch.float64)


@register
class JaccardScore(PathScore):
    name = "jaccard"

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return 1 - self.profile_.layer_jaccard(batch.paths, batch.predictions).mean(1)


@register
class LogitGaussScore(PathScore):
    name = "logit-gauss"

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return self.profile_.logit_distance(batch.gate_logits, batch.predictions)


@register
class LayerGaussScore(PathScore):
    """One-class Gaussian over per-layer path evidence (profile.layer_features)."""

    name = "layer-gauss"
    with_confidence = False

    def _features(self, batch: PathBatch) -> torch.Tensor:
        feats = self.profile_.layer_features(batch)
        return torch.cat([feats, confidence_features(batch.logits)], 1) if self.with_confidence else feats

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        super()._fit(clean, adversarial)
        self.one_class_ = GaussianOneClass.fit(self._features(clean))

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return self.one_class_.score(self._features(batch))

    def _state(self) -> dict[str, torch.Tensor]:
        return {**super()._state(), "one_class.location": self.one_class_.location,
                "one_class.precision": self.one_class_.precision}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        super()._load_state(tensors, extra)
        self.one_class_ = GaussianOneClass(tensors["one_class.location"], tensors["one_class.precision"])


@register
class LayerGaussConfScore(LayerGaussScore):
    name = "layer-gauss-conf"
    with_confidence = True


@register
class LogitGaussConfScore(PathScore):
    """Standardised logit-gauss distance and -log max softmax, summed."""

    name = "logit-gauss-conf"

    def _parts(self, batch: PathBatch) -> torch.Tensor:
        """(N, 2): logit-gauss distance and -log max softmax."""
        distance = self.profile_.logit_distance(batch.gate_logits, batch.predictions)
        return torch.stack([distance, confidence_features(batch.logits)[:, 0].double()], 1)

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        super()._fit(clean, adversarial)
        parts = self._parts(clean)
        # mean and std of both parts on the clean fit data
        self.standardise_ = torch.stack([parts.mean(0), parts.std(0).clamp_min(1e-6)]).float()

    def _standardised(self, batch: PathBatch) -> torch.Tensor:
        return (self._parts(batch) - self.standardise_[0].double()) / self.standardise_[1].double()

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return self._standardised(batch).sum(1)

    def _state(self) -> dict[str, torch.Tensor]:
        return {**super()._state(), "standardise": self.standardise_}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        super()._load_state(tensors, extra)
        self.standardise_ = tensors["standardise"]


@register
class LogitGaussMaxScore(LogitGaussConfScore):
    name = "logit-gauss-max"

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return self._standardised(batch).max(1).values

