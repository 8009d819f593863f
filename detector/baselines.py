"""Baseline detectors, run on the same model and samples as the path detector.

Each is a registered ``Detector`` (base.py): same fit / score_samples /
calibrate / predict, larger = more suspicious.

* ``MaxSoftmax`` (Hendrycks & Gimpel 2017): score = -max softmax probability.
* ``Mahalanobis`` (Lee et al. 2018): class-conditional Gaussians with a tied
  covariance on penultimate features, fitted on clean training images with
  their true labels (predicted ones where none are given); score = min over
  classes of the squared Mahalanobis distance.  This is the unsupervised
  single-layer form; the paper's input pre-processing and multi-layer
  ensemble need adversarial examples to tune and would make it supervised.
* ``LID`` (Ma et al. 2018): local intrinsic dimensionality of every layer's
  activations, estimated by maximum likelihood from the k nearest
  neighbours among a reference minibatch of clean images, then a logistic
  regression (supervised) on clean and noisy (negative) against
  adversarial (positive) LID vectors.  The paper estimates each test
  image's LID within the minibatch it is evaluated in; here the reference
  minibatch is fixed at fit time (``n_reference`` clean images, drawn
  seeded), so a score depends on its image alone.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance

from .base import Detector, register
from .paths import PathBatch
from .supervised import LinearScorer


@register
class MaxSoftmax(Detector):
    name = "max-softmax"

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return -torch.softmax(batch.logits.double(), dim=1).max(1).values


@register
class Mahalanobis(Detector):
    name = "mahalanobis"

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        labels = clean.labels if clean.labels is not None else clean.predictions
        f = clean.features.double()
        missing = [c for c in range(clean.num_classes) if not (labels == c).any()]
        if missing:
            raise ValueError(f"mahalanobis: no clean example of classes {missing}")
        means = torch.stack([f[labels == c].mean(0) for c in range(clean.num_classes)])
        cov = EmpiricalCovariance(assume_centered=True).fit((f - means[labels]).numpy())
        self.means_ = means
        self.precision_ = torch.from_numpy(cov.precision_)

    def _score(self, batch: PathBatch) -> torch.Tensor:
        d = batch.features.double()[:, None, :] - self.means_[None]  # (N, C, F)
        dist = torch.einsum("ncf,fg,ncg->nc", d, self.precision_, d)
        return dist.min(1).values

    def _state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means_, "precision": self.precision_}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.means_, self.precision_ = tensors["means"].double(), tensors["precision"].double()


def mle_lid(query: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """LID_hat(x) = -( 1/k * sum_i log(r_i(x) / r_k(x)) )^-1 over the k
    nearest neighbours of x among ``reference`` (Ma et al. 2018, eq. 4)."""
    dist = torch.cdist(query.double(), reference.double())
    dist = dist.sort(dim=1).values
    dist = dist[:, 1:k + 1] if exclude_self else dist[:, :k]
    dist = dist.clamp_min(1e-12)
    ratio = torch.log(dist / dist[:, -1:]).sum(1) / k
    return -1.0 / ratio.clamp_max(-1e-12)


@register
class LID(Detector):
    name = "lid"
    supervised = True
    requires = frozenset({"activations"})

    def __init__(self, target_fpr: float = 0.05, k: int = 20, n_reference: int = 100, seed: int = 0,
                 chunk: int = 256) -> None:
        super().__init__(target_fpr)
        self.k, self.n_reference, self.seed, self.chunk = k, n_reference, seed, chunk

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.k < 1 or self.n_reference <= self.k or self.chunk < 1:
            raise ValueError(f"need k >= 1, n_reference > k and chunk >= 1; got k={self.k}, "
                             f"n_reference={self.n_reference}, chunk={self.chunk}")

    def lid_vectors(self, batch: PathBatch, exclude_self: bool = False) -> np.ndarray:
        """(N, layers) LID of every row against the reference minibatch."""
        rows = []
        for start in range(0, len(batch), self.chunk):
            acts = [a[start:start + self.chunk] for a in batch.activations]
            rows.append(torch.stack([mle_lid(a, r, self.k, exclude_self)
                                     for a, r in zip(acts, self.reference_)], 1))
        return torch.cat(rows).numpy()

    def fit(self, clean: PathBatch, adversarial: PathBatch | None = None,
            noisy: PathBatch | None = None) -> "LID":
        """Clean (and, as in the paper, noisy) rows are negatives,
        adversarial rows positives."""
        self._noisy = noisy
        try:
            return super().fit(clean, adversarial)
        finally:
            self._noisy = None

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        if len(clean) <= self.n_reference:
            raise ValueError(f"lid: needs more than n_reference={self.n_reference} clean examples, got {len(clean)}")
        order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(self.seed))
        reference, rest = order[:self.n_reference], order[self.n_reference:]
        self.reference_ = [a[reference].double() for a in clean.activations]
        negatives = [self.lid_vectors(clean.subset(rest))]
        if self._noisy is not None:
            negatives.append(self.lid_vectors(self._noisy))
        positives = self.lid_vectors(adversarial)
        x = np.concatenate(negatives + [positives])
        y = np.concatenate([np.zeros(sum(len(n) for n in negatives)), np.ones(len(positives))])
        self.scorer_ = LinearScorer.fit(x, y, seed=self.seed)

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return torch.from_numpy(self.scorer_.decision(self.lid_vectors(batch)))

    def _state(self) -> dict[str, torch.Tensor]:
        refs = {f"reference.{i}": r for i, r in enumerate(self.reference_)}
        return {**refs, **self.scorer_.to_tensors("scorer")}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        n = len([k for k in tensors if k.startswith("reference.")])
        self.reference_ = [tensors[f"reference.{i}"].double() for i in range(n)]
        self.scorer_ = LinearScorer.from_tensors(tensors, "scorer")
