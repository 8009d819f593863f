"""Calculation paths: extraction in one forward pass, and path statistics.

A path is the concatenation of the binary gate vectors of all gated layers,
input to output (``ConvNet.gated_widths`` gives the layer sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import ConvNet


@dataclass
class PathBatch:
    logits: torch.Tensor       # (N, classes)
    paths: torch.Tensor        # (N, D) of 0/1
    gate_logits: torch.Tensor  # (N, D)
    features: torch.Tensor     # (N, F) penultimate features

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)


@torch.no_grad()
def extract_paths(model: ConvNet, images: torch.Tensor, batch_size: int = 500) -> PathBatch:
    """Logits, binary paths, gate logits and features of ``images``, one
    inference-mode forward pass per batch."""
    if not model.gated:
        raise ValueError("paths need the decoupled (gated) network")
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(images), batch_size):
            trace = model.trace(images[start:start + batch_size])
            parts.append((trace.logits, trace.path, trace.path_logits, trace.features))
    finally:
        model.train(was_training)
    return PathBatch(*(torch.cat([p[i] for p in parts]) for i in range(4)))


def split_layers(paths: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(paths, widths, dim=1))


def active_fraction(paths: torch.Tensor, widths: list[int]) -> dict:
    """Mean fraction of gates on: overall (over all D gates) and per layer."""
    per_layer = [float(p.float().mean()) for p in split_layers(paths, widths)]
    return {"mean": float(paths.float().mean()), "per_layer": per_layer}


def distinct_paths(paths: torch.Tensor) -> int:
    return int(torch.unique(paths.to(torch.uint8), dim=0).shape[0])


def jaccard_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard similarity of binary rows; two empty sets count as 1."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def class_jaccard(paths: torch.Tensor, labels: torch.Tensor, chunk: int = 1000) -> dict:
    """Mean Jaccard similarity of paths within a class and between classes,
    over all pairs of distinct images (chunked to bound memory)."""
    within_sum = between_sum = 0.0
    within_n = between_n = 0
    for start in range(0, len(paths), chunk):
        sim = jaccard_matrix(paths[start:start + chunk], paths)
        same = labels[start:start + chunk, None] == labels[None, :]
        rows = torch.arange(start, min(start + chunk, len(paths)))
        self_pair = torch.zeros_like(same)
        self_pair[torch.arange(len(rows)), rows] = True
        within = same & ~self_pair
        within_sum += float(sim[within].sum())
        within_n += int(within.sum())
        between_sum += float(sim[~same].sum())
        between_n += int((~same).sum())
    return {
        "within_class": within_sum / max(within_n, 1),
        "between_class": between_sum / max(between_n, 1),
    }


def path_summary(model: ConvNet, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The path figures a model card reports for a labelled image set."""
    batch = extract_paths(model, images)
    widths = model.gated_widths
    return {
        "images": len(images),
        "accuracy": float((batch.predictions == labels).float().mean()),
        "active_fraction": active_fraction(batch.paths, widths),
        "distinct_paths": distinct_paths(batch.paths),
        "path_bits": int(batch.paths.shape[1]),
        "jaccard": class_jaccard(batch.paths, labels),
    }
