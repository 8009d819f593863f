"""Every detector of the library, registered in ``DETECTORS`` by name.

Importing this module registers the path scores, the supervised path
detector and the baselines (max-softmax, mahalanobis, lid, energy,
mahalanobis-multi, knn, nic); ``make_detector(name, **params)`` builds one
and ``Detector.from_saved`` reloads any of them.
"""

from __future__ import annotations

from .base import DETECTORS, Detector, NotFittedError, make_detector, register
from .baselines import (
    KNN,
    LID,
    NIC,
    Energy,
    Mahalanobis,
    MaxSoftmax,
    MultiLayerMahalanobis,
)
from .scores import PATH_SCORES, PathScore
from .supervised import SupervisedPathDetector

__all__ = [
    "DETECTORS", "KNN", "LID", "NIC", "PATH_SCORES", "Detector", "Energy", "Mahalanobis", "MaxSoftmax",
    "MultiLayerMahalanobis", "NotFittedError", "PathScore", "SupervisedPathDetector", "make_detector", "register",
]
