"""Per-image inspection: what ``pathguard.inspect`` and the service answer
for each image.

``Inspector`` couples a verified bundle with its fitted detector and turns a
batch of images (pixels in [0, 1], the model's input shape) into one
``Inspection`` per image, from a single forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import DEFAULT_BUNDLE, Bundle, load_bundle, load_detector
from .paths import extract_paths, split_layers
from .scores import PathScore


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


class Inspector:
    def __init__(self, bundle: Bundle, detector: PathScore) -> None:
        if detector.threshold_ is None:
            raise ValueError("the bundle's detector has no threshold; run `pathguard fit`")
        self.bundle = bundle
        self.detector = detector
        self.model = bundle.decoupled.eval()

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BUNDLE) -> "Inspector":
        bundle = load_bundle(path)
        return cls(bundle, load_detector(bundle))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.bundle.input_shape

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("pixel values must be finite and in [0, 1]")

    @torch.no_grad()
    def inspect(self, images: torch.Tensor, include_path: bool = False) -> list[Inspection]:
        self.check_images(images)
        batch = extract_paths(self.model, images.float())
        scores = self.detector.score_samples(batch)
        flags = self.detector.flag(scores)
        deviations = self.detector.layer_deviations(batch)
        probs = torch.softmax(batch.logits, dim=1)
        confidence, predicted = probs.max(dim=1)
        layers = split_layers(batch.paths.to(torch.int64), batch.widths)
        out = []
        for i in range(len(images)):
            c = int(predicted[i])
            out.append(Inspection(
                predicted_class=c,
                label=self.bundle.classes[c],
                confidence=float(confidence[i]),
                adversarial=bool(flags[i]),
                score=float(scores[i]),
                threshold=float(self.detector.threshold_),
                layer_deviations=[float(d) for d in deviations[i]],
                active_fraction=float(batch.paths[i].float().mean()),
                layer_paths=[layer[i].tolist() for layer in layers] if include_path else None,
            ))
        return out
