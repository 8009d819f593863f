"""Every detector of the library, registered in ``DETECTORS`` by name.

Importing this module registers the path scores, the supervised path
detector and the baselines; ``make_detector(name, **params)`` builds one
and ``Detector.from_saved`` reloads any of them.
"""

from __future__ import annotations

from .base import DETECTORS, Detector, NotFittedError, make_detector, register
from .baselines import LID, Mahalanobis, MaxSoftmax
from .scores import PATH_SCORES, PathScore
from .supervised import SupervisedPathDetector

__all__ = [
    "DETECTORS", "LID", "PATH_SCORES", "Detector", "Mahalanobis", "MaxSoftmax", "NotFittedError", "PathScore",
    "SupervisedPathDetector", "make_detector", "register",
]
