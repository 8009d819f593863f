"""Path-statistics profile of clean data (docs/method.md, "Profiles").

For each class c (the model's *predicted* class) the profile keeps the count
of clean training images and, per gate, how often it is on (p_c), plus the
class means and a tied precision matrix of the continuous gate logits.  All
of it is tensors, stored in safetensors; nothing is pickled.

``layer_features`` turns a batch of paths into per-layer evidence that a
path does not fit its class; the scores in ``scores.py`` are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from sklearn.covariance import LedoitWolf

from .paths import PathBatch, layer_jaccard, split_layers

PROFILE_VERSION = 1


class ProfileMismatch(ValueError):
    """A profile was fitted on a model with other layers or classes."""


@dataclass
class PathProfile:
    widths: list[int]          # gate count of each gated layer
    counts: torch.Tensor       # (C,) clean images per predicted class
    on_freq: torch.Tensor      # (C, D) smoothed P(gate on | predicted class)
    logit_mean: torch.Tensor   # (C, D) class means of the gate logits
    logit_precision: torch.Tensor  # (D, D) tied, Ledoit-Wolf shrunk

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def class_paths(self) -> torch.Tensor:
        """The effective path of each class: gates on for most of its images."""
        return (self.on_freq > 0.5).float()

    @classmethod
    def fit(cls, batch: PathBatch, smoothing: float = 1.0) -> "PathProfile":
        """Per predicted class: image counts, smoothed on-frequencies, gate
        logit means; one tied, shrunk precision of the gate logits."""
        widths, num_classes = batch.widths, batch.num_classes
        if batch.paths.shape[1] != sum(widths):
            raise ProfileMismatch(f"paths have {batch.paths.shape[1]} gates, layers sum to {sum(widths)}")
        pred = batch.predictions
        paths = batch.paths.double()
        logits = batch.gate_logits.double()
        counts = torch.bincount(pred, minlength=num_classes).double()
        on = torch.zeros(num_classes, paths.shape[1], dtype=torch.float64).index_add_(0, pred, paths)
        # Laplace smoothing: a gate never seen on in a class is improbable, not impossible.
        on_freq = (on + smoothing) / (counts[:, None] + 2 * smoothing)
        sums = torch.zeros_like(on).index_add_(0, pred, logits)
        mean = sums / counts.clamp_min(1)[:, None]
        centred = (logits - mean[pred]).numpy()
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(list(widths), counts.float(), on_freq.float(), mean.float(), torch.from_numpy(precision).float())

    def check_fits(self, widths: list[int], num_classes: int) -> None:
        if list(widths) != list(self.widths):
            raise ProfileMismatch(
                f"profile was fitted on gated layers of widths {self.widths}, the model has {list(widths)}")
        if num_classes != self.num_classes:
            raise ProfileMismatch(f"profile has {self.num_classes} classes, the model {num_classes}")

    # ----------------------------------------------------------- evidence

    def layer_nll(self, paths: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per-layer Bernoulli negative log-likelihood of each path under the
        given classes' on-frequencies, divided by the layer width: (N, L)."""
        p = self.on_freq[classes]
        v = paths.float()
        nll = -(v * p.log() + (1 - v) * (1 - p).log())
        return torch.stack([part.mean(1) for part in split_layers(nll, self.widths)], dim=1)

    def layer_jaccard(self, paths: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per-layer Jaccard similarity of each path to the class path: (N, L)."""
        return layer_jaccard(paths, self.class_paths[classes], self.widths)

    def logit_distance(self, gate_logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of gate logits to the class mean.

        Computed in float64: the precision matrix is ill-conditioned, and in
        float32 the quadratic form loses about 5% of its value to rounding,
        enough to make one image's score depend on the batch it came in."""
        mean, precision = self._logit_stats64
        d = gate_logits.double() - mean[classes]
        return ((d @ precision) * d).sum(1)

    @cached_property
    def _logit_stats64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate-logit means and precision in float64, converted once
        rather than on every call (the (D, D) precision of vgg7's 1,088
        gates is a 9.5 MB copy).  A profile is not modified after it is
        made."""
        return self.logit_mean.double(), self.logit_precision.double()

    def layer_features(self, batch: PathBatch) -> torch.Tensor:
        """(N, 3L) path evidence: per-layer NLL under the top-1 class, and
        1 - Jaccard to the top-1 and the top-2 class paths (Qiu et al. 2019
        compare a path with the paths of the two most likely classes)."""
        top2 = batch.logits.topk(2, dim=1).indices
        nll = self.layer_nll(batch.paths, top2[:, 0])
        j1 = self.layer_jaccard(batch.paths, top2[:, 0])
        j2 = self.layer_jaccard(batch.paths, top2[:, 1])
        return torch.cat([nll, 1 - j1, 1 - j2], dim=1)

    # ---------------------------------------------------------- storage

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "profile.widths": torch.tensor(self.widths, dtype=torch.int64),
            "profile.counts": self.counts, "profile.on_freq": self.on_freq,
            "profile.logit_mean": self.logit_mean, "profile.logit_precision": self.logit_precision,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PathProfile":
        try:
            return cls(
                tensors["profile.widths"].tolist(), tensors["profile.counts"], tensors["profile.on_freq"],
                tensors["profile.logit_mean"], tensors["profile.logit_precision"],
            )
        except KeyError as exc:
            raise ProfileMismatch(f"profile is missing tensor {exc}") from exc


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """(N, 2): -log max softmax and the negative top-1/top-2 logit margin."""
    log_probs = torch.log_softmax(logits, dim=1)
    top2 = logits.topk(2, dim=1).values
    return torch.stack([-log_probs.max(1).values, -(top2[:, 0] - top2[:, 1])], dim=1)

