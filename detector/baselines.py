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

Stronger clean-data-only baselines (issue 11), each checked against its
paper's formula in tests/test_baselines_reference.py:

* ``Energy`` (Liu et al. 2020): score = E(x) = -T logsumexp(f(x) / T).
* ``MultiLayerMahalanobis`` (Lee et al. 2018, every block, unsupervised):
  the ``Mahalanobis`` score on each block's pooled features, each block's
  score standardised on the clean fit data, equal weights.
* ``KNN`` (Sun et al. 2022): distance from the L2-normalised penultimate
  features to their k-th nearest clean training neighbour.
* ``NIC`` (Ma et al. 2019): one-class SVMs on every layer's activations
  (value invariants) and on the class probabilities of consecutive layers
  (provenance invariants), combined by a final one-class SVM; every fitted
  scikit-learn model is kept as tensors and evaluated in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from .base import Detector, register
from .paths import PathBatch
from .supervised import LinearScorer


@register
class MaxSoftmax(Detector):
    name = "max-softmax"

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return -torch.softmax(batch.logits.double(), dim=1).max(1).values


def class_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the precision of one covariance tied over the
    classes (the maximum-likelihood estimate, pseudo-inverted), float64 on
    the CPU (Lee et al. 2018, eq. 1)."""
    f, labels = features.detach().cpu().double(), torch.as_tensor(labels).cpu()
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"{what}: no clean example of classes {missing}")
    means = torch.stack([f[labels == c].mean(0) for c in range(num_classes)])
    cov = EmpiricalCovariance(assume_centered=True).fit((f - means[labels]).numpy())
    return means, torch.from_numpy(cov.precision_)


def min_mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor,
                    chunk: int = 2048) -> torch.Tensor:
    """min over classes c of (x - mu_c)^T P (x - mu_c), per row."""
    x = features.cpu().double()
    out = []
    for start in range(0, len(x), chunk):
        d = x[start:start + chunk, None, :] - means[None]  # (n, C, F)
        out.append(torch.einsum("ncf,fg,ncg->nc", d, precision, d).min(1).values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@register
class Mahalanobis(Detector):
    name = "mahalanobis"

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        labels = clean.labels if clean.labels is not None else clean.predictions
        self.means_, self.precision_ = class_gaussians(clean.features, labels, clean.num_classes, self.name)

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return min_mahalanobis(batch.features, self.means_, self.precision_)

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
            noisy: PathBatch | None = None) -> LID:
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


# ------------------------------------------------------------------ energy


@register
class Energy(Detector):
    """Energy score (Liu, Wang, Owens, Li; NeurIPS 2020, eq. 7):
    E(x; f) = -T * logsumexp_i f_i(x) / T over the logits f(x).  Clean
    (in-distribution) inputs have *low* energy, so the score, larger = more
    suspicious, is E(x) itself (the paper flags -E(x) <= tau).  T = 1 as in
    the paper's inference-time setting; nothing is learnt."""

    name = "energy"

    def __init__(self, target_fpr: float = 0.05, temperature: float = 1.0) -> None:
        super().__init__(target_fpr)
        self.temperature = temperature

    def _validate_params(self) -> None:
        super()._validate_params()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def _score(self, batch: PathBatch) -> torch.Tensor:
        t = float(self.temperature)
        return -t * torch.logsumexp(batch.logits.double() / t, dim=1)


# ------------------------------------------------- multi-layer Mahalanobis

MAX_GAUSSIAN_DIM = 4096  # a tied covariance over more dimensions than this is not what blocks are for


def _layer_view(batch: PathBatch, source: str) -> str:
    """Which per-layer representation a multi-layer detector reads."""
    if source == "auto":
        source = "blocks" if batch.blocks else "activations"
    if not getattr(batch, source):
        raise ValueError(f"needs every block's features: observe(..., blocks=True) (source={source!r})")
    return source


@register
class MultiLayerMahalanobis(Detector):
    """Mahalanobis over every block (Lee, Lee, Lee, Shin; NeurIPS 2018),
    the unsupervised ensemble.

    Per layer l: class means (true labels, else predictions) and one tied
    covariance of that layer's features on clean data, M_l(x) = min over
    classes of the squared Mahalanobis distance (eq. 2; as ``mahalanobis``
    on the penultimate features).  The paper combines the layers with
    weights a logistic regression learns on adversarial (or OOD) validation
    data and pre-processes the input with a tuned step; both need
    adversarial tuning and are left out.  Instead every layer's score is
    **standardised** with the mean and standard deviation of its scores on
    the clean fit data, and the layers get **equal weights**: score = mean
    over l of (M_l(x) - mean_l) / std_l.

    The layers are the spatially averaged outputs of every block
    (``PathBatch.blocks``: ``observe(..., blocks=True)``).  ``source="auto"``
    reads ``blocks`` when the batch has them, else the flattened
    ``activations`` (each block, the features and the logits) as they are;
    the view seen in ``fit`` is stored and scoring refuses another one.
    """

    name = "mahalanobis-multi"
    requires = frozenset({"blocks"})

    def __init__(self, target_fpr: float = 0.05, source: str = "auto") -> None:
        super().__init__(target_fpr)
        self.source = source

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.source not in ("auto", "blocks", "activations"):
            raise ValueError(f"source must be 'auto', 'blocks' or 'activations', got {self.source!r}")

    def _check_requires(self, batch: PathBatch) -> None:
        _layer_view(batch, self.source)

    def _layers(self, batch: PathBatch, view: str) -> list[torch.Tensor]:
        layers = getattr(batch, view)
        if not layers:
            raise ValueError(f"{self.name} was fitted on {view}: observe(..., {view}=True)")
        return layers

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        self.view_ = _layer_view(clean, self.source)
        layers = self._layers(clean, self.view_)
        too_wide = [f.shape[1] for f in layers if f.shape[1] > MAX_GAUSSIAN_DIM]
        if too_wide:
            raise ValueError(f"{self.name}: layers of {too_wide} dimensions; observe(..., blocks=True) "
                             "gives every block's pooled features")
        labels = clean.labels if clean.labels is not None else clean.predictions
        self.means_, self.precisions_ = [], []
        for f in layers:
            means, precision = class_gaussians(f, labels, clean.num_classes, self.name)
            self.means_.append(means)
            self.precisions_.append(precision)
        raw = self.layer_scores(clean)
        self.centre_, self.spread_ = raw.mean(0), raw.std(0).clamp_min(1e-12)

    def layer_scores(self, batch: PathBatch) -> torch.Tensor:
        """(N, layers) M_l(x), before standardising."""
        layers = self._layers(batch, self.view_)
        dims = [m.shape[1] for m in self.means_]
        if [f.shape[1] for f in layers] != dims:
            raise ValueError(f"{self.name}: fitted on {self.view_} of dimensions {dims}, "
                             f"got {[f.shape[1] for f in layers]}")
        return torch.stack([min_mahalanobis(f, m, p) for f, m, p in zip(layers, self.means_, self.precisions_)], 1)

    def _score(self, batch: PathBatch) -> torch.Tensor:
        return ((self.layer_scores(batch) - self.centre_) / self.spread_).mean(1)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"centre": self.centre_, "spread": self.spread_}
        for i, (m, p) in enumerate(zip(self.means_, self.precisions_)):
            state[f"means.{i}"], state[f"precision.{i}"] = m, p
        return state

    def _extra(self) -> dict:
        return {"view": self.view_, "layers": len(self.means_)}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.view_ = extra["view"]
        n = int(extra["layers"])
        self.means_ = [tensors[f"means.{i}"].double() for i in range(n)]
        self.precisions_ = [tensors[f"precision.{i}"].double() for i in range(n)]
        self.centre_, self.spread_ = tensors["centre"].double(), tensors["spread"].double()


# --------------------------------------------------------------------- KNN


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kth_neighbour_distance(query: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Euclidean distance from every query row to its k-th nearest row of
    ``bank`` (k = 1: the nearest), computed in chunks of queries."""
    out = [torch.cdist(query[s:s + chunk], bank).kthvalue(k, dim=1).values for s in range(0, len(query), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=bank.dtype)


@register
class KNN(Detector):
    """Deep nearest neighbours (Sun, Ming, Zhu, Li; ICML 2022, "Out-of-
    distribution detection with deep nearest neighbors"): z = f / ||f||_2 of
    the penultimate features; the clean training set's normalised features
    are kept; score = ||z - z_(k)||_2, the distance to the k-th nearest of
    them (the paper flags -distance <= lambda).  k = 50, the paper's choice
    for CIFAR-10; the whole fit set is the bank (no subsampling)."""

    name = "knn"

    def __init__(self, target_fpr: float = 0.05, k: int = 50, chunk: int = 256) -> None:
        super().__init__(target_fpr)
        self.k, self.chunk = k, chunk

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.k < 1 or self.chunk < 1:
            raise ValueError(f"k and chunk must be >= 1, got {self.k}, {self.chunk}")

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        if len(clean) < self.k:
            raise ValueError(f"{self.name}: needs at least k={self.k} clean examples, got {len(clean)}")
        self.bank_ = l2_normalise(clean.features.detach().cpu().double())

    def _score(self, batch: PathBatch) -> torch.Tensor:
        query = l2_normalise(batch.features.cpu().double())
        return kth_neighbour_distance(query, self.bank_, self.k, self.chunk)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank_}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        self.bank_ = tensors["bank"].double()


# --------------------------------------------------------------------- NIC
# scikit-learn fits the models; each is kept as tensors and evaluated in
# torch (float64), so a NIC detector saves to safetensors and never pickles.


@dataclass
class Projection:
    """A fitted PCA: z = (x - mean) @ components^T (``PCA.transform``
    without whitening)."""

    mean: torch.Tensor        # (d,)
    components: torch.Tensor  # (k, d)

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int, seed: int) -> Projection:
        k = max(1, min(n_components, x.shape[1], x.shape[0] - 1))
        return cls.from_sklearn(PCA(n_components=k, random_state=seed).fit(x))

    @classmethod
    def from_sklearn(cls, pca: PCA) -> Projection:
        return cls(torch.from_numpy(np.asarray(pca.mean_, dtype=np.float64)),
                   torch.from_numpy(np.asarray(pca.components_, dtype=np.float64)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.components": self.components}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> Projection:
        return cls(tensors[f"{prefix}.mean"].double(), tensors[f"{prefix}.components"].double())


@dataclass
class OneClassRBF:
    """A fitted one-class SVM with an RBF kernel (Schoelkopf et al. 2001):
    decision(x) = sum_i alpha_i exp(-gamma ||x - s_i||^2) - rho over the
    support vectors s_i, exactly ``OneClassSVM.decision_function``
    (negative outside the learnt region)."""

    support: torch.Tensor  # (S, d)
    dual: torch.Tensor     # (S,) alpha_i
    intercept: float       # -rho
    gamma: float

    @classmethod
    def fit(cls, x: np.ndarray, nu: float) -> OneClassRBF:
        """gamma = 1 / (d * Var(x)), scikit-learn's ``gamma="scale"``."""
        var = float(x.var())
        gamma = 1.0 / (x.shape[1] * var) if var > 0 else 1.0
        return cls.from_sklearn(OneClassSVM(kernel="rbf", nu=nu, gamma=gamma).fit(x), gamma)

    @classmethod
    def from_sklearn(cls, model: OneClassSVM, gamma: float) -> OneClassRBF:
        return cls(torch.from_numpy(np.asarray(model.support_vectors_, dtype=np.float64)),
                   torch.from_numpy(np.asarray(model.dual_coef_[0], dtype=np.float64)),
                   float(model.intercept_[0]), float(gamma))

    def decision(self, x: torch.Tensor) -> torch.Tensor:
        s = self.support
        sq = (x * x).sum(1, keepdim=True) + (s * s).sum(1) - 2.0 * (x @ s.T)
        return torch.exp(-self.gamma * sq.clamp_min(0.0)) @ self.dual + self.intercept

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.support": self.support, f"{prefix}.dual": self.dual,
                f"{prefix}.intercept": torch.tensor([self.intercept], dtype=torch.float64),
                f"{prefix}.gamma": torch.tensor([self.gamma], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> OneClassRBF:
        return cls(tensors[f"{prefix}.support"].double(), tensors[f"{prefix}.dual"].double(),
                   float(tensors[f"{prefix}.intercept"][0]), float(tensors[f"{prefix}.gamma"][0]))


@dataclass
class SoftmaxRegression:
    """A fitted multinomial logistic regression, its input standardisation
    folded into the weights: P(class | x) = softmax(x W^T + b), exactly
    ``predict_proba`` of the scaler + regression pipeline."""

    coef: torch.Tensor       # (K, d)
    intercept: torch.Tensor  # (K,)

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray, seed: int) -> SoftmaxRegression:
        if len(np.unique(labels)) < 2:
            raise ValueError("a provenance classifier needs clean examples of at least two predicted classes")
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(x), labels)
        return cls.from_sklearn(model, scaler)

    @classmethod
    def from_sklearn(cls, model: LogisticRegression, scaler: StandardScaler | None = None) -> SoftmaxRegression:
        coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
        if coef.shape[0] == 1:  # two classes: P(classes_[1]) = sigmoid(w.x + b) = softmax([0, w.x + b])
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        if scaler is not None:
            coef = coef / scaler.scale_
            intercept = intercept - coef @ scaler.mean_
        return cls(torch.from_numpy(np.ascontiguousarray(coef)), torch.from_numpy(np.ascontiguousarray(intercept)))

    def proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.coef.T + self.intercept, dim=1)

    def copy(self) -> SoftmaxRegression:
        return SoftmaxRegression(self.coef.clone(), self.intercept.clone())

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.coef": self.coef, f"{prefix}.intercept": self.intercept}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> SoftmaxRegression:
        return cls(tensors[f"{prefix}.coef"].double(), tensors[f"{prefix}.intercept"].double())


def fit_split(n: int, max_fit: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded draw of at most ``max_fit`` of ``n`` rows, cut into the rows
    the per-layer models learn from and the ``holdout`` share that
    standardises and combines their scores."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(n, max_fit)]
    n_combine = max(2, round(holdout * len(order)))
    if len(order) - n_combine < 10:
        raise ValueError(f"nic: needs at least {10 + n_combine} clean examples, got {n}")
    return order[n_combine:], order[:n_combine]


@register
class NIC(Detector):
    """Neural-network invariant checking (Ma, Liu, Tao, Lee, Zhang; NDSS
    2019) on the raw activations, fitted on clean data only.

    Layers: ``PathBatch.activations`` (every block's flattened gated
    activations, then the penultimate features and the logits:
    ``observe(..., activations=True)``).  Fitted on at most ``max_fit``
    clean rows (seeded), of which a ``holdout`` share is kept back:

    * **value invariants**, one per layer: a PCA to ``n_components``
      dimensions (the paper's one-class SVMs read the raw values; a PCA
      keeps the kernel computations small on 25,000-dimensional blocks) and
      a one-class SVM (RBF, gamma = "scale", ``nu``) on it;
      VI_l(x) = -decision_l(x);
    * **provenance invariants**, one per pair of consecutive layers: a
      softmax classifier per layer (logistic regression on the standardised
      PCA coordinates) predicting the model's own predicted label, then a
      one-class SVM on the concatenated class probabilities of layers l and
      l + 1 (the paper's derived models); PI_l(x) = -decision(x);
    * **combination**: every invariant's score is standardised with its mean
      and standard deviation on the held-out clean rows; ``combine="svm"``
      (default, the paper's) fits a final one-class SVM (RBF, gamma =
      "scale", ``nu``) on the held-out standardised invariant vectors and
      scores -decision; ``combine="square"`` is the mean of the squared
      standardised invariants.  Both count a deviation in either direction:
      with gamma = "scale" a layer's kernel is wide next to its class
      clusters, so its decision function can peak *between* them, where
      clean activations are rare, and attacked or off-distribution
      activations often score as *more* typical than clean ones (on 300
      validation images of the shipped bundle the equal-weight mean of the
      signed invariants ranked FGSM examples at AUROC 0.12, the final SVM
      at 0.91, the squares at 0.90).  The paper's authors tuned nu and gamma
      per layer on adversarial examples; here both are fixed (nu 0.1 as
      their value invariants, sklearn's gamma = "scale").

    Larger = more suspicious throughout.  Every model is kept as tensors
    (PCA mean/components; SVM support vectors, dual coefficients, intercept,
    gamma; regression weights) and evaluated in torch, float64 on the CPU.
    """

    name = "nic"
    requires = frozenset({"activations"})

    def __init__(self, target_fpr: float = 0.05, n_components: int = 32, nu: float = 0.1, max_fit: int = 3000,
                 holdout: float = 0.3, combine: str = "svm", seed: int = 0, chunk: int = 512) -> None:
        super().__init__(target_fpr)
        self.n_components, self.nu, self.max_fit, self.holdout = n_components, nu, max_fit, holdout
        self.combine, self.seed, self.chunk = combine, seed, chunk

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.n_components < 1 or self.max_fit < 12 or self.chunk < 1:
            raise ValueError(f"need n_components >= 1, max_fit >= 12, chunk >= 1; got {self.n_components}, "
                             f"{self.max_fit}, {self.chunk}")
        if not (0.0 < self.nu <= 1.0 and 0.0 < self.holdout < 1.0):
            raise ValueError(f"need 0 < nu <= 1 and 0 < holdout < 1; got {self.nu}, {self.holdout}")
        if self.combine not in ("svm", "square"):
            raise ValueError(f"combine must be 'svm' or 'square', got {self.combine!r}")

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        models_rows, combine_rows = fit_split(len(clean), self.max_fit, self.holdout, self.seed)
        labels = clean.predictions[models_rows].numpy()
        self.projections_, self.values_, self.classifiers_ = [], [], []
        probs = []
        for acts in clean.activations:
            x = acts[models_rows].detach().cpu().double().numpy()
            projection = Projection.fit(x, self.n_components, self.seed)
            z = projection(torch.from_numpy(x)).numpy()
            classifier = SoftmaxRegression.fit(z, labels, self.seed)
            self.projections_.append(projection)
            self.values_.append(OneClassRBF.fit(z, self.nu))
            self.classifiers_.append(classifier)
            probs.append(classifier.proba(torch.from_numpy(z)))
        self.provenance_ = [OneClassRBF.fit(torch.cat([p, q], 1).numpy(), self.nu)
                            for p, q in pairwise(probs)]
        held_out = self.invariant_scores(clean.subset(combine_rows))
        self.centre_, self.spread_ = held_out.mean(0), held_out.std(0).clamp_min(1e-12)
        standard = (held_out - self.centre_) / self.spread_
        self.final_ = OneClassRBF.fit(standard.numpy(), self.nu) if self.combine == "svm" else None

    def invariant_scores(self, batch: PathBatch) -> torch.Tensor:
        """(N, 2L - 1): the L value invariants, then the L - 1 provenance
        invariants, each -decision of its one-class SVM (unstandardised)."""
        dims = [p.mean.shape[0] for p in self.projections_]
        if [a.shape[1] for a in batch.activations] != dims:
            raise ValueError(f"{self.name}: fitted on activations of dimensions {dims}, "
                             f"got {[a.shape[1] for a in batch.activations]}")
        parts = [self._invariants([a[s:s + self.chunk] for a in batch.activations])
                 for s in range(0, len(batch), self.chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, 2 * len(dims) - 1, dtype=torch.float64)

    def _invariants(self, layers: list[torch.Tensor]) -> torch.Tensor:
        z = [p(a.detach().cpu().double()) for p, a in zip(self.projections_, layers)]
        values = [-svm.decision(zl) for svm, zl in zip(self.values_, z)]
        probs = [c.proba(zl) for c, zl in zip(self.classifiers_, z)]
        provenance = [-svm.decision(torch.cat([p, q], 1)) for svm, (p, q) in zip(self.provenance_, pairwise(probs))]
        return torch.stack(values + provenance, 1)

    def _score(self, batch: PathBatch) -> torch.Tensor:
        standard = (self.invariant_scores(batch) - self.centre_) / self.spread_
        return (standard ** 2).mean(1) if self.final_ is None else -self.final_.decision(standard)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"combine.centre": self.centre_, "combine.spread": self.spread_}
        for i, (p, v, c) in enumerate(zip(self.projections_, self.values_, self.classifiers_)):
            state.update({**p.to_tensors(f"layer.{i}.pca"), **v.to_tensors(f"layer.{i}.value"),
                          **c.to_tensors(f"layer.{i}.classifier")})
        for i, svm in enumerate(self.provenance_):
            state.update(svm.to_tensors(f"pair.{i}.provenance"))
        if self.final_ is not None:
            state.update(self.final_.to_tensors("final"))
        return state

    def _extra(self) -> dict:
        return {"layers": len(self.projections_), "dims": [p.mean.shape[0] for p in self.projections_],
                "support_vectors": [len(v.support) for v in self.values_ + self.provenance_]}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        n = int(extra["layers"])
        self.projections_ = [Projection.from_tensors(tensors, f"layer.{i}.pca") for i in range(n)]
        self.values_ = [OneClassRBF.from_tensors(tensors, f"layer.{i}.value") for i in range(n)]
        self.classifiers_ = [SoftmaxRegression.from_tensors(tensors, f"layer.{i}.classifier") for i in range(n)]
        self.provenance_ = [OneClassRBF.from_tensors(tensors, f"pair.{i}.provenance") for i in range(n - 1)]
        self.centre_, self.spread_ = tensors["combine.centre"].double(), tensors["combine.spread"].double()
        self.final_ = OneClassRBF.from_tensors(tensors, "final") if "final.support" in tensors else None
