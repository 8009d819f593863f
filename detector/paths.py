"""Calculation paths: one batched inference pass, and path statistics.

A path is the concatenation of the binary gate vectors of all gated layers,
input to output (``ConvNet.gated_widths`` gives the layer sizes).
``observe`` is the one place that runs a model over a set of images in
inference mode and keeps what the detectors read (docs/method.md):
logits, paths, gate logits, penultimate features and, when asked for,
every block's pooled features or full activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

import torch

from .models import ConvNet, Trace


@dataclass
class PathBatch:
    """What a model's forward pass says about N images, one row each.

    ``widths`` are the gated layers' sizes (the path's layout); ``labels``
    are the true classes where known (clean training data), else None.
    ``blocks`` (pooled features of every block), ``spreads`` (every block's
    per-channel standard deviation over space) and ``activations`` (every
    block's flattened activations, then the features and the logits) are
    empty unless asked for.
    """

    logits: torch.Tensor       # (N, classes)
    paths: torch.Tensor        # (N, D) of 0/1
    gate_logits: torch.Tensor  # (N, D)
    features: torch.Tensor     # (N, F) penultimate features
    widths: list[int] = field(default_factory=list)
    labels: torch.Tensor | None = None
    blocks: list[torch.Tensor] = field(default_factory=list)
    activations: list[torch.Tensor] = field(default_factory=list)
    spreads: list[torch.Tensor] = field(default_factory=list)

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    def __len__(self) -> int:
        return len(self.logits)

    @classmethod
    def from_trace(cls, trace: Trace, widths: list[int]) -> "PathBatch":
        activations = []
        if trace.activations:
            activations = [a.flatten(1) for a in trace.activations] + [trace.features, trace.logits]
        return cls(trace.logits, trace.path, trace.path_logits, trace.features, list(widths),
                   blocks=list(trace.block_features), activations=activations, spreads=list(trace.block_spreads))

    def subset(self, index) -> "PathBatch":
        """Rows ``index`` (a boolean mask or integer indices)."""
        index = torch.as_tensor(index)
        return replace(self, logits=self.logits[index], paths=self.paths[index],
                       gate_logits=self.gate_logits[index], features=self.features[index],
                       labels=None if self.labels is None else self.labels[index],
                       blocks=[b[index] for b in self.blocks], activations=[a[index] for a in self.activations],
                       spreads=[s[index] for s in self.spreads])

    @classmethod
    def concat(cls, batches: list["PathBatch"]) -> "PathBatch":
        first = batches[0]
        tensors = {}
        for f in fields(cls):
            values = [getattr(b, f.name) for b in batches]
            if f.name == "widths":
                continue
            if f.name == "labels":
                tensors[f.name] = None if any(v is None for v in values) else torch.cat(values)
            elif f.name in ("blocks", "activations", "spreads"):
                tensors[f.name] = [torch.cat(parts) for parts in zip(*values)]
            else:
                tensors[f.name] = torch.cat(values)
        return cls(widths=list(first.widths), **tensors)


def device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def observe(model: ConvNet, images: torch.Tensor, batch_size: int = 500, labels: torch.Tensor | None = None,
            blocks: bool = False, activations: bool = False) -> PathBatch:
    """Run ``model`` in inference mode over ``images`` (pixels in [0, 1]) in
    batches on the model's device; results come back on the CPU.  The
    model's training mode is restored afterwards."""
    device = device_of(model)
    was_training = model.training
    if was_training:  # switching modes walks every module: only when needed (small passes feel it)
        model.eval()
    parts = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            trace = model.trace(chunk, keep_activations=activations, keep_blocks=blocks)
            parts.append(PathBatch.from_trace(_to_cpu(trace, model.gated), model.gated_widths))
    finally:
        if was_training:
            model.train()
    if not parts:
        raise ValueError("observe needs at least one image")
    batch = parts[0] if len(parts) == 1 else PathBatch.concat(parts)
    batch.labels = None if labels is None else torch.as_tensor(labels).cpu()
    return batch


def _to_cpu(trace: Trace, gated: bool) -> Trace:
    cpu = Trace(trace.logits.cpu(), trace.features.cpu(), [z.cpu() for z in trace.gate_logits],
                [v.cpu() for v in trace.gates], [], [a.cpu() for a in trace.activations],
                [b.cpu() for b in trace.block_features], [s.cpu() for s in trace.block_spreads])
    if not gated:  # a plain network has no gates: an empty path
        n = len(cpu.logits)
        cpu.gate_logits, cpu.gates = [torch.zeros(n, 0)], [torch.zeros(n, 0)]
    return cpu


def extract_paths(model: ConvNet, images: torch.Tensor, batch_size: int = 500) -> PathBatch:
    """Logits, binary paths, gate logits and features of ``images``."""
    if not model.gated:
        raise ValueError("paths need the decoupled (gated) network")
    return observe(model, images, batch_size)


def predict_classes(model: ConvNet, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Class predictions in inference mode (int64, on the CPU)."""
    return observe(model, images, batch_size).predictions


def correct_mask(model: ConvNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """True where ``model`` (in inference mode) classifies the image correctly."""
    return predict_classes(model, images, batch_size) == torch.as_tensor(labels).cpu()


def split_layers(paths: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(paths, widths, dim=1))


def active_fraction(paths: torch.Tensor, widths: list[int]) -> dict:
    """Mean fraction of gates on: overall (over all D gates) and per layer."""
    per_layer = [float(p.float().mean()) for p in split_layers(paths, widths)]
    return {"mean": float(paths.float().mean()), "per_layer": per_layer}


def distinct_paths(paths: torch.Tensor) -> int:
    return int(torch.unique(paths.to(torch.uint8), dim=0).shape[0])


# ------------------------------------------------------------------ Jaccard

def jaccard_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard similarity of binary rows, (len(a), len(b)); two
    empty sets count as 1."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def layer_jaccard(paths: torch.Tensor, reference: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Per-layer Jaccard similarity of each binary row of ``paths`` (N, D)
    to the matching row of ``reference`` (N, D) or to one row (D,): (N, L).
    Two empty sets count as 1.

    The per-layer counts are products with a (D, L) layer-membership matrix:
    a few kernels for all layers at once instead of a handful per layer (the
    per-layer loop was a visible share of a lone image's scoring).  Counts
    of 0/1 values are small integers, exact in float32 in any summation
    order, so on binary paths the result is the same bit for bit as summing
    each layer on its own."""
    v = torch.as_tensor(paths).float()
    r = torch.as_tensor(reference).float().expand_as(v)
    members = _layer_membership(tuple(widths)).to(v.device)
    inter = (v * r) @ members
    union = v @ members + r @ members - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


@lru_cache(maxsize=64)
def _layer_membership(widths: tuple[int, ...]) -> torch.Tensor:
    """(D, L) float: 1 where gate d belongs to gated layer l."""
    return torch.repeat_interleave(torch.eye(len(widths)), torch.tensor(widths, dtype=torch.long), dim=0)


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
    return summarise_paths(extract_paths(model, images), labels)


def summarise_paths(batch: PathBatch, labels: torch.Tensor) -> dict:
    """``path_summary`` of an observed batch."""
    labels = torch.as_tensor(labels).cpu()
    return {
        "images": len(batch),
        "accuracy": float((batch.predictions == labels).float().mean()),
        "active_fraction": active_fraction(batch.paths, batch.widths),
        "distinct_paths": distinct_paths(batch.paths),
        "path_bits": int(batch.paths.shape[1]),
        "jaccard": class_jaccard(batch.paths, labels),
    }
