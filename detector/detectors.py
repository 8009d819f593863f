"""Every detector of the library, registered in ``DETECTORS`` by name.

Importing this module registers the path scores, the supervised path
detectors (path-supervised; channels-supervised, on detector v2's
channels) and the baselines (max-softmax, mahalanobis, lid, energy,
mahalanobis-multi, knn, nic) and detector v2's channel scores
(provenance.py: class-evidence, provenance, path-knn, fusion, fusion-path,
fusion-moments, fusion-evidence, fusion-fisher); ``make_detector(name, **params)`` builds one and
``Detector.from_saved`` reloads any of them.
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
from .provenance import (
    ChannelScore,
    ClassEvidenceScore,
    FusionEvidenceScore,
    FusionFisherScore,
    FusionMomentsScore,
    FusionPathScore,
    FusionScore,
    PathKNNScore,
    ProvenanceScore,
)
from .channel_supervised import ChannelSupervisedDetector
from .scores import PathScore
from .supervised import SupervisedPathDetector

# Every registered path score, in registration order: the candidates of
# ``pathguard fit``'s ablation ("channels" has no default channels to try).
PATH_SCORES = tuple(name for name, cls in DETECTORS.items()
                    if issubclass(cls, PathScore) and name != ChannelScore.name)

__all__ = [
    "DETECTORS", "KNN", "LID", "NIC", "PATH_SCORES", "ChannelScore", "ChannelSupervisedDetector", "ClassEvidenceScore",
    "Detector", "Energy", "FusionEvidenceScore", "FusionFisherScore", "FusionMomentsScore", "FusionPathScore",
    "FusionScore", "Mahalanobis", "MaxSoftmax", "MultiLayerMahalanobis", "NotFittedError",
    "PathKNNScore", "PathScore", "ProvenanceScore", "SupervisedPathDetector", "make_detector", "register",
]
