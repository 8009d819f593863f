"""Per-image inspection: what ``pathguard.inspect`` and the service answer
for each image.

``Inspector`` couples a verified bundle with its fitted detector and turns a
batch of images (pixels in [0, 1], the model's input shape) into one
``Inspection`` per image.

**An image's answer does not depend on the other images of its batch.**
CPU convolutions and matrix products (oneDNN, MKL) pick their algorithm, and
with it the order in which they add, by the shape of the whole batch: the
same image scored alone and inside a batch of 64 differed in its float32
logits (up to ~5e-6) and in its score (up to ~5e-5), so near the threshold
a flag could depend on what else was sent.  ``inspect`` therefore runs the
forward pass and the scoring in chunks of exactly ``chunk`` images (default
``DEFAULT_CHUNK``), the last one padded with black images; every computation
then has one shape, and an image's row is computed the same way wherever it
sits in the chunk and whatever shares it (tests/test_service_determinism.py
checks this bit for bit).  The padding costs at most ``chunk - 1`` images'
worth of compute per call.  ``chunk=None`` runs the whole batch in one pass
(the answers then depend, in the last bits, on the batch's size).  The
images are also made contiguous (N, C, H, W) first: the convolutions also
choose their algorithm by the input's memory layout, so the same pixels in a
channels-last-strided tensor would otherwise be answered differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bundle import DEFAULT_BUNDLE, Bundle, load_bundle, load_detector
from .paths import split_layers
from .scores import PathScore

# Images per forward pass.  Small enough that one image alone is answered
# quickly (a lone image costs a pass over ``DEFAULT_CHUNK`` images), large
# enough that a big batch loses little to the per-pass overhead.
DEFAULT_CHUNK = 8


@dataclass
class Inspection:
    predicted_class: int
    label: str
    confidence: float
    adversarial: bool
    score: float
    threshold: float
    layer_deviations: list[float]
    active_fraction: float
    layer_paths: list[list[int]] | None = None
    # Which layer deviates and which class each gated layer's path points to
    # (PathScore.evidence): most_deviating, layer_classes (names), early_class
    # (the first gated layer's), p_values (per channel, or None).
    evidence: dict | None = None


class Inspector:
    def __init__(self, bundle: Bundle, detector: PathScore, chunk: int | None = DEFAULT_CHUNK) -> None:
        if detector.threshold_ is None:
            raise ValueError("the bundle's detector has no threshold; run `pathguard fit`")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, not {chunk}")
        self.bundle = bundle
        self.detector = detector
        self.model = bundle.decoupled.eval()
        self.chunk = chunk

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BUNDLE, chunk: int | None = DEFAULT_CHUNK) -> "Inspector":
        bundle = load_bundle(path)
        return cls(bundle, load_detector(bundle), chunk=chunk)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.bundle.input_shape

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("pixel values must be finite and in [0, 1]")

    @torch.inference_mode()
    def inspect(self, images: torch.Tensor, include_path: bool = False) -> list[Inspection]:
        """One ``Inspection`` per image, in order (see the module's docstring
        on chunks)."""
        self.check_images(images)
        # One memory layout too: oneDNN picks its algorithm by the input's
        # strides as well (a channels-last-strided batch is computed another
        # way, and its answers differ in the last bits).
        images = images.float()
        n, c, h, w = images.shape
        if images.stride() != (c * h * w, h * w, w, 1):  # (a 1-channel tensor can pass is_contiguous())
            images = images.clone(memory_format=torch.contiguous_format)
        if n == 0:
            return []
        size = self.chunk or n
        out: list[Inspection] = []
        for start in range(0, n, size):
            part = images[start:start + size]
            rows = len(part)
            if rows < size:  # pad with black images to the one shape every pass has
                part = torch.cat([part, part.new_zeros((size - rows, *part.shape[1:]))])
            out += self._inspect_chunk(part, rows, include_path)
        return out

    def _inspect_chunk(self, images: torch.Tensor, rows: int, include_path: bool) -> list[Inspection]:
        """The first ``rows`` answers of one pass over ``images``."""
        batch = self.detector.observe(self.model, images, batch_size=len(images))
        # on the whole chunk: one shape for every computation (module docstring)
        scores, evidence = self.detector.score_and_evidence(batch)
        scores = np.asarray(scores, dtype=np.float64)
        evidence = evidence[:rows]
        flags = self.detector.flag(scores)
        deviations = np.asarray(self.detector.layer_deviations(batch))
        probs = torch.softmax(batch.logits, dim=1)
        confidence, predicted = probs.max(dim=1)
        active = batch.paths.float().mean(dim=1)
        layers = split_layers(batch.paths[:rows].to(torch.int64), batch.widths) if include_path else None
        threshold = float(self.detector.threshold_)
        classes = self.bundle.classes
        for item in evidence:
            item["layer_classes"] = [classes[c] for c in item["layer_classes"]]
            item["early_class"] = item["layer_classes"][0] if item["layer_classes"] else None
        predicted_ = predicted[:rows].tolist()
        confidence_ = confidence[:rows].tolist()
        scores_ = scores[:rows].tolist()
        flags_ = flags[:rows].tolist()
        deviations_ = deviations[:rows].tolist()
        active_ = active[:rows].tolist()
        paths_ = [layer.tolist() for layer in layers] if layers is not None else None
        return [Inspection(
            predicted_class=c, label=classes[c], confidence=confidence_[i], adversarial=bool(flags_[i]),
            score=scores_[i], threshold=threshold, layer_deviations=deviations_[i], active_fraction=active_[i],
            layer_paths=[layer[i] for layer in paths_] if paths_ is not None else None, evidence=evidence[i],
        ) for i, c in enumerate(predicted_)]
