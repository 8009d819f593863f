"""Baseline detectors, run on the same model and samples as the path detector.

* ``MaxSoftmax`` (Hendrycks & Gimpel 2017): score = -max softmax probability.
* ``Mahalanobis`` (Lee et al. 2018): class-conditional Gaussians with a tied
  covariance on penultimate features, fitted on clean training images with
  their labels; score = min over classes of the Mahalanobis distance.  This
  is the unsupervised single-layer form; the paper's input pre-processing
  and multi-layer ensemble need adversarial examples to tune and would make
  it a supervised detector.
* ``LID`` (Ma et al. 2018): local intrinsic dimensionality of every layer's
  activations, estimated by maximum likelihood from the k nearest
  neighbours in a minibatch of clean images, then a logistic regression
  (supervised) trained on clean, noisy and adversarial LID vectors.

All scores follow the detector convention: larger = more suspicious.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance

from .models import ConvNet
from .supervised import LinearScorer


def max_softmax_score(logits: torch.Tensor) -> np.ndarray:
    return (-torch.softmax(logits.double(), dim=1).max(1).values).numpy()


@dataclass
class Mahalanobis:
    means: torch.Tensor | None = None      # (C, F)
    precision: torch.Tensor | None = None  # (F, F)

    def fit(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "Mahalanobis":
        f = features.double()
        means = torch.stack([f[labels == c].mean(0) for c in range(num_classes)])
        centred = (f - means[labels]).numpy()
        cov = EmpiricalCovariance(assume_centered=True).fit(centred)
        self.means = means
        self.precision = torch.from_numpy(cov.precision_)
        return self

    def score_samples(self, features: torch.Tensor) -> np.ndarray:
        d = features.double()[:, None, :] - self.means[None]  # (N, C, F)
        dist = torch.einsum("ncf,fg,ncg->nc", d, self.precision, d)
        return dist.min(1).values.numpy()


# --------------------------------------------------------------------- LID

@torch.no_grad()
def layer_activations(model: ConvNet, images: torch.Tensor) -> list[torch.Tensor]:
    """Flattened activations of every convolution block, the penultimate
    features and the logits, in inference mode."""
    model.eval()
    trace = model.trace(images, keep_activations=True)
    return [a.flatten(1) for a in trace.activations] + [trace.features, trace.logits]


def mle_lid(query: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """LID_hat(x) = -( 1/k * sum_i log(r_i(x) / r_k(x)) )^-1 over the k
    nearest neighbours of x among ``reference`` (Ma et al. 2018, eq. 4)."""
    dist = torch.cdist(query.double(), reference.double())
    if exclude_self:
        dist = dist.sort(dim=1).values[:, 1:k + 1]
    else:
        dist = dist.sort(dim=1).values[:, :k]
    dist = dist.clamp_min(1e-12)
    ratio = torch.log(dist / dist[:, -1:]).sum(1) / k
    return -1.0 / ratio.clamp_max(-1e-12)


def lid_features(model: ConvNet, clean: torch.Tensor, others: list[torch.Tensor], k: int = 20,
                 batch_size: int = 100) -> tuple[np.ndarray, list[np.ndarray]]:
    """LID vectors (N, layers) of clean images and of each aligned set in
    ``others`` (noisy, adversarial, ...), each estimated against the clean
    minibatch it belongs to, as in the paper's reference implementation."""
    clean_out, other_out = [], [[] for _ in others]
    for start in range(0, len(clean), batch_size):
        ref_acts = layer_activations(model, clean[start:start + batch_size])
        kk = min(k, ref_acts[0].shape[0] - 1)
        if kk < 1:
            raise ValueError("LID needs minibatches of at least 2 clean images")
        clean_out.append(torch.stack([mle_lid(a, a, kk, True) for a in ref_acts], 1))
        for i, other in enumerate(others):
            acts = layer_activations(model, other[start:start + batch_size])
            other_out[i].append(torch.stack([mle_lid(a, r, kk, False) for a, r in zip(acts, ref_acts)], 1))
    return torch.cat(clean_out).numpy(), [torch.cat(o).numpy() for o in other_out]


@dataclass
class LID:
    k: int = 20
    batch_size: int = 100
    seed: int = 0
    scorer: LinearScorer | None = None

    def fit(self, model: ConvNet, clean: torch.Tensor, noisy: torch.Tensor, adversarial: torch.Tensor) -> "LID":
        """Clean and noisy images are negatives, adversarial ones positives."""
        lid_clean, (lid_noisy, lid_adv) = lid_features(model, clean, [noisy, adversarial], self.k, self.batch_size)
        x = np.concatenate([lid_clean, lid_noisy, lid_adv])
        y = np.concatenate([np.zeros(len(lid_clean) + len(lid_noisy)), np.ones(len(lid_adv))])
        self.scorer = LinearScorer.fit(x, y, seed=self.seed)
        return self

    def score_pairs(self, model: ConvNet, clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores of aligned clean and adversarial test images."""
        lid_clean, (lid_adv,) = lid_features(model, clean, [adversarial], self.k, self.batch_size)
        return self.scorer.decision(lid_clean), self.scorer.decision(lid_adv)
