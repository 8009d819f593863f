"""One interface for every detector, path scores and baselines alike.

In the style of scikit-learn's outlier detectors and pytorch-ood
(docs/architecture.md):

* hyperparameters go to the constructor and are only stored there; ``fit``
  validates them (``_validate_params``);
* ``fit(clean)`` learns from clean data only; a *supervised* detector also
  takes adversarial examples: ``fit(clean, adversarial)``;
* ``score_samples(batch)``: one float per image, larger = more suspicious;
* ``calibrate(held_out_clean)`` sets ``threshold_`` to the (1 - target_fpr)
  quantile of held-out clean scores (``confidence=0.95``: raised until the
  FPR's upper 95% bound is at most target_fpr, detector/calibration.py);
  ``predict(batch)`` is exactly ``score_samples(batch) > threshold_``;
* everything learnt lives in attributes ending in ``_``; ``state_tensors()``
  and ``config()`` hold all of it as tensors and JSON, and
  ``from_saved(config, tensors)`` rebuilds an identical detector, so a
  detector saves to safetensors + JSON and never to pickle.

Detectors read ``PathBatch`` rows (paths.observe); ``requires`` names the
optional parts a detector needs ("blocks", "activations"), so the caller
observes them only when some detector asks.

``DETECTORS`` is the registry: ``@register`` adds a class under its
``name``; ``make_detector(name, **params)`` builds one.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np
import torch

from .calibration import fpr_threshold
from .paths import PathBatch, observe

DETECTORS: dict[str, type["Detector"]] = {}


class NotFittedError(RuntimeError):
    """A detector was used before ``fit`` (or ``calibrate``)."""


def register(cls: type["Detector"]) -> type["Detector"]:
    if not cls.name or cls.name in DETECTORS:
        raise ValueError(f"detector name {cls.name!r} is empty or taken")
    DETECTORS[cls.name] = cls
    return cls


def make_detector(name: str, **params) -> "Detector":
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}") from None
    return cls(**params)


class Detector:
    """Base class; subclasses set ``name`` and implement ``_fit``,
    ``_score`` and, if they learn anything, ``_state``/``_load_state``."""

    name: ClassVar[str] = ""
    supervised: ClassVar[bool] = False
    requires: ClassVar[frozenset] = frozenset()

    def __init__(self, target_fpr: float = 0.05) -> None:
        self.target_fpr = target_fpr

    # ------------------------------------------------------------ params

    @classmethod
    def _param_names(cls) -> list[str]:
        names = []
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                for p in inspect.signature(klass.__init__).parameters.values():
                    if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in names:
                        names.append(p.name)
        return names

    def get_params(self) -> dict:
        """The constructor's arguments, as scikit-learn's ``get_params``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def _validate_params(self) -> None:
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # --------------------------------------------------------------- fit

    def fit(self, clean: PathBatch, adversarial: PathBatch | None = None) -> "Detector":
        """Learn from clean rows (and, if supervised, adversarial ones).
        Clears any threshold: a refitted detector needs a new calibration."""
        self._validate_params()
        if len(clean) == 0:
            raise ValueError(f"{self.name}: fit needs clean examples")
        if self.supervised and (adversarial is None or len(adversarial) == 0):
            raise ValueError(f"{self.name} is supervised: fit(clean, adversarial) needs adversarial examples")
        self._check_requires(clean)
        self._fit(clean, adversarial)
        self.threshold_ = None
        self.fitted_ = True
        return self

    def _fit(self, clean: PathBatch, adversarial: PathBatch | None) -> None:
        """Learn the fitted state (default: nothing to learn)."""

    def _check_requires(self, batch: PathBatch) -> None:
        if "blocks" in self.requires and not batch.blocks:
            raise ValueError(f"{self.name} needs every block's features: observe(..., blocks=True)")
        if "activations" in self.requires and not batch.activations:
            raise ValueError(f"{self.name} needs the activations: observe(..., activations=True)")

    def blocks_read(self) -> frozenset[int] | None:
        """The indices of the blocks whose features a fitted detector reads
        (``PathBatch.blocks``/``spreads``), or None for every block (the
        default for a detector that ``requires`` blocks: it may read any).
        The skipping engine computes only these (``SparseGatedNet.observe``);
        the others then hold (N, 0) placeholders, so a detector that read
        one anyway would fail on the shape rather than score on zeros."""
        return None if "blocks" in self.requires else frozenset()

    def observe(self, model, images: torch.Tensor, **kwargs) -> PathBatch:
        """``paths.observe`` of ``images``, keeping the optional parts this
        detector reads (``requires``: every block's features, activations)."""
        return observe(model, images, blocks="blocks" in self.requires,
                       activations="activations" in self.requires, **kwargs)

    @property
    def is_fitted(self) -> bool:
        return getattr(self, "fitted_", False)

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load a fitted one")

    # ------------------------------------------------------------- score

    def score_tensor(self, batch: PathBatch) -> torch.Tensor:
        """Scores as a float64 tensor; differentiable where the detector's
        arithmetic is (the adaptive attack uses it on soft paths)."""
        self._require_fitted()
        self._check_requires(batch)
        return self._score(batch).double()

    def _score(self, batch: PathBatch) -> torch.Tensor:
        raise NotImplementedError

    def score_samples(self, batch: PathBatch) -> np.ndarray:
        """(N,) float64, larger = more suspicious."""
        return self.score_tensor(batch).detach().cpu().numpy()

    def calibrate(self, held_out_clean: PathBatch, confidence: float = 0.0) -> "Detector":
        """threshold_ from held-out clean scores: their (1 - target_fpr)
        quantile (the 'higher' rule: at most target_fpr of them lie above);
        with ``confidence`` c > 0, high enough that the FPR's upper c-bound
        is at most target_fpr (calibration.fpr_threshold)."""
        return self.calibrate_scores(self.score_samples(held_out_clean), confidence)

    def calibrate_scores(self, clean_scores: np.ndarray, confidence: float = 0.0) -> "Detector":
        """``calibrate`` on scores this detector already gave held-out clean
        images."""
        self._require_fitted()
        self.threshold_ = fpr_threshold(clean_scores, self.target_fpr, confidence)
        return self

    def predict(self, batch: PathBatch) -> np.ndarray:
        """True where the score is above the calibrated threshold (flagged)."""
        return self.flag(self.score_samples(batch))

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """The decision rule on scores already computed: score > threshold_."""
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError(f"{type(self).__name__} has no threshold: call calibrate() first")
        return np.asarray(scores) > self.threshold_

    # ----------------------------------------------------------- storage

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learnt, as named tensors (for safetensors)."""
        self._require_fitted()
        return {k: v.detach().cpu().contiguous() for k, v in self._state().items()}

    def _state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_state(self, tensors: dict[str, torch.Tensor], extra: dict) -> None:
        """Restore what ``_state`` (and ``_extra``) saved."""

    def _extra(self) -> dict:
        """Fitted facts that are not tensors (JSON)."""
        return {}

    def config(self) -> dict:
        """What, with ``state_tensors()``, rebuilds this detector (JSON)."""
        return {"detector": self.name, "params": _json_params(self.get_params()),
                "threshold": getattr(self, "threshold_", None), "fitted": self._extra()}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Detector":
        """Rebuild a saved detector (any registered class: ``cls`` may be
        ``Detector`` itself)."""
        name = config.get("detector")
        klass = cls if cls.name else DETECTORS.get(name)
        if klass is None or klass.name != name:
            raise ValueError(f"saved detector {name!r} is not a registered {cls.__name__}")
        detector = klass(**config.get("params", {}))
        detector._validate_params()
        detector._load_state(tensors, config.get("fitted") or {})
        detector.fitted_ = True
        detector.threshold_ = config.get("threshold")
        return detector


def _json_params(params: dict) -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, (int, float, str, bool, list, type(None))):
            raise TypeError(f"parameter {key}={value!r} cannot be saved as JSON")
        out[key] = value
    return out
