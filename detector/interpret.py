"""What the calculation paths of a decoupled network say about the classes.

The numbers behind `pathguard explain` (docs/method.md, "Calculation
paths"): per predicted class the raw on-frequency of every gated filter,
class effective paths and their similarity, mean pairwise path similarity,
and the filters most specific to each class.

* On-frequencies here are raw fractions, without the Laplace smoothing of
  the detector's profile (profile.py): they describe what was seen, they
  are not a likelihood.
* Classes no image is predicted as have no on-frequency (NaN rows).
* Two empty paths have Jaccard similarity 1 (paths.jaccard_matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .paths import jaccard_matrix, split_layers

DEFAULT_TOP_K = 5


@dataclass
class LayerInfo:
    name: str    # "conv<k>", k = 1-based position of the convolution
    block: int   # 0-based index of the convolution in the network
    width: int   # filters (= gates) in the layer
    offset: int  # index of its first gate in the concatenated path

    def to_json(self) -> dict:
        return {"name": self.name, "block": self.block, "width": self.width, "gate_offset": self.offset}


def gated_layers(model) -> list[LayerInfo]:
    """Name, position, width and path offset of each gated convolution."""
    layers, offset = [], 0
    for index, block in enumerate(model.blocks):
        if block.control is None:
            continue
        width = block.conv.out_channels
        layers.append(LayerInfo(f"conv{index + 1}", index, width, offset))
        offset += width
    return layers


def class_on_frequency(paths: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw on-frequency per predicted class: ((C, D) float64, NaN rows for
    classes without images; (C,) int64 image counts)."""
    paths = paths.double()
    counts = torch.bincount(predictions, minlength=num_classes)
    on = torch.zeros(num_classes, paths.shape[1], dtype=torch.float64).index_add_(0, predictions, paths)
    freq = (on / counts.clamp_min(1)[:, None].double()).numpy()
    freq[counts.numpy() == 0] = np.nan
    return freq, counts.numpy().astype(np.int64)


def effective_paths(on_freq: np.ndarray) -> np.ndarray:
    """Class effective paths: filters on for more than half of the class's
    images (profile.PathProfile.class_paths); NaN rows stay all-zero."""
    return np.nan_to_num(on_freq, nan=0.0) > 0.5


def effective_path_similarity(on_freq: np.ndarray, widths: list[int] | None = None) -> np.ndarray:
    """(C, C) Jaccard similarity of the class effective paths, over all
    gates or, with ``widths``, a list of per-layer matrices; NaN where a
    class has no images."""
    present = ~np.isnan(on_freq).all(axis=1)
    eff = torch.from_numpy(effective_paths(on_freq).astype(np.float64))
    parts = [eff] if widths is None else split_layers(eff, widths)
    out = []
    for part in parts:
        sim = jaccard_matrix(part, part).double().numpy()
        sim[~present, :] = np.nan
        sim[:, ~present] = np.nan
        out.append(sim)
    return out[0] if widths is None else out


def pairwise_class_jaccard(paths: torch.Tensor, predictions: torch.Tensor, num_classes: int,
                           chunk: int = 500) -> np.ndarray:
    """(C, C) mean Jaccard similarity of individual paths between images
    predicted as class a and as class b (self-pairs excluded on the
    diagonal); NaN where there is no pair."""
    onehot = torch.nn.functional.one_hot(predictions, num_classes).double()
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for start in range(0, len(paths), chunk):
        sim = jaccard_matrix(paths[start:start + chunk], paths).double()
        sums += onehot[start:start + chunk].T @ sim @ onehot
    n = onehot.sum(0)
    pairs = n[:, None] * n[None, :] - torch.diag(n)
    sums -= torch.diag(n)  # every image is Jaccard-1 with itself
    mean = torch.where(pairs > 0, sums / pairs.clamp_min(1), torch.full_like(sums, float("nan")))
    return mean.numpy()


def specificity(on_freq: np.ndarray) -> np.ndarray:
    """P(on | c) minus the unweighted mean of P(on | c') over the other
    classes c' that have images: (C, D); NaN rows for classes without
    images, and for every class when no other class has images."""
    present = ~np.isnan(on_freq).all(axis=1)
    filled = np.nan_to_num(on_freq, nan=0.0)
    total, n_present = filled[present].sum(axis=0), int(present.sum())
    out = np.full_like(filled, np.nan)
    if n_present < 2:
        return out
    for c in np.flatnonzero(present):
        others = (total - filled[c]) / (n_present - 1)
        out[c] = filled[c] - others
    return out


def specific_filters(on_freq: np.ndarray, widths: list[int], k: int = DEFAULT_TOP_K) -> list[list[list[dict]]]:
    """For each class and gated layer, the ``k`` filters (fewer if the layer
    is narrower) with the largest specificity, best first; ties go to the
    lower filter index.  Classes without images (or without another class
    to compare with) get empty lists.  Each entry: filter (index in the
    layer), gate (index in the path), on_frequency, others_mean,
    specificity."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    spec = specificity(on_freq)
    filled = np.nan_to_num(on_freq, nan=0.0)
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)
    result = []
    for c in range(on_freq.shape[0]):
        per_layer = []
        for offset, width in zip(offsets, widths):
            s = spec[c, offset:offset + width]
            if np.isnan(s).all():
                per_layer.append([])
                continue
            order = np.lexsort((np.arange(width), -s))[:k]  # by -specificity, then index
            per_layer.append([{
                "filter": int(j), "gate": int(offset + j),
                "on_frequency": json_number(filled[c, offset + j]),
                "others_mean": json_number(filled[c, offset + j] - s[j]),
                "specificity": json_number(s[j]),
            } for j in order])
        result.append(per_layer)
    return result


# ------------------------------------------------------------ JSON helpers

def json_number(x, digits: int = 6):
    """A JSON-safe float: rounded, NaN -> None."""
    x = float(x)
    return None if np.isnan(x) else round(x, digits)


def json_matrix(a: np.ndarray, digits: int = 6) -> list:
    return [[json_number(x, digits) for x in row] for row in np.asarray(a)]


def json_rows_or_null(a: np.ndarray, present: np.ndarray, digits: int = 6) -> list:
    return [[json_number(x, digits) for x in row] if ok else None for row, ok in zip(np.asarray(a), present)]
