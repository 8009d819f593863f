"""PathGuard: adversarial-image detection from the calculation paths of a
decoupled network.

The public API (the README's "Python API" section shows it at work)::

    import pathguard

    bundle = pathguard.load_bundle()                 # the shipped model, verified
    inspector = pathguard.Inspector.load()           # bundle + its fitted detector
    results = inspector.inspect(images)              # (N, C, H, W) pixels in [0, 1]
    results = pathguard.inspect(images)              # the same, with the default bundle
    # (engine="auto": each image alone, off filters skipped, on the CPU; "dense": whole passes)

    batch = pathguard.observe(bundle.decoupled, images)   # logits, paths, gate logits, ...
    detector = pathguard.make_detector("logit-gauss-max").fit(clean_batch)
    detector.calibrate(held_out_batch).predict(batch)

Every detector (``pathguard.DETECTORS``) has the same interface: ``fit`` on
clean data (supervised ones also take adversarial examples),
``score_samples`` (larger = more suspicious), ``calibrate`` and ``predict``
(score > threshold_).  The layers below: ``pathguard.detector`` (the
library), ``pathguard.attacks``, ``pathguard.service``, and the commands in
``pathguard.cli`` / ``pathguard.jobs``.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from .detector.bundle import DEFAULT_BUNDLE, Bundle, load_bundle, load_detector
from .detector.data import ImageSet, load_dataset
from .detector.detectors import (
    DETECTORS, LID, PATH_SCORES, Detector, Mahalanobis, MaxSoftmax, NotFittedError, PathScore,
    SupervisedPathDetector, make_detector,
)
from .detector.inspection import Inspection, Inspector
from .detector.paths import PathBatch, observe

__version__ = version("pathguard")

__all__ = [
    "DEFAULT_BUNDLE", "DETECTORS", "LID", "PATH_SCORES", "Bundle", "Detector", "ImageSet", "Inspection",
    "Inspector", "Mahalanobis", "MaxSoftmax", "NotFittedError", "PathBatch", "PathScore",
    "SupervisedPathDetector", "inspect", "load_bundle", "load_dataset", "load_detector", "make_detector",
    "observe",
]


def inspect(images: torch.Tensor, bundle: str | Path = DEFAULT_BUNDLE, include_path: bool = False,
            engine: str = "auto") -> list[Inspection]:
    """Classify and score ``images`` ((N, C, H, W) floats in [0, 1], the
    bundle's input shape) with a bundle's model and detector: one
    ``Inspection`` per image (class, confidence, flag, score, threshold,
    per-layer deviations).  ``engine``: how the forward pass runs ("auto":
    image by image with switched-off filters skipped on the CPU, as the
    service does; "sparse"; "dense"; docs/method.md, "Inference engines")."""
    return Inspector.load(bundle, engine=engine).inspect(images, include_path=include_path)
