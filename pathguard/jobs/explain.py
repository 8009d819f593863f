"""`pathguard explain`: what the calculation paths of a decoupled network say.

Interpretation figures (PNG) and the numbers behind them (JSON) for a bundle
and a set of images (by default the first 2,000 of the test split):

(a) ``class_path_maps``    per class (the model's *predicted* class) and
    gated layer, the on-frequency P(filter on | class) of every filter;
(b) ``class_similarity``   class-to-class path similarity: the Jaccard
    similarity of the class *effective paths* (filters on for more than
    half of the class's images, all layers together), and the mean
    Jaccard similarity of the individual paths of two classes' images;
(c) ``specific_filters``   per class and layer, the k filters most specific
    to the class: P(on | class) minus the unweighted mean of P(on | c') over
    the other classes that occur;
(d) ``image_<index>_path`` one image's path against the effective path of
    its predicted class: per layer its bits beside the class on-frequency,
    and the per-layer deviation 1 - Jaccard(image bits, class path), next to
    the median deviation of the class's own images for scale.

Choices (written down as design.md asks):

* On-frequencies are the raw fractions of the chosen images, without the
  Laplace smoothing of the detector's profile (profile.py): they describe
  what was seen, they are not a likelihood.  With hundreds of images per
  class the two differ by well under 1%.
* Classes no chosen image is predicted as have no on-frequency; they appear
  as ``null`` in the JSON and as grey rows/cells in the figures.
* Two empty paths have Jaccard similarity 1 (as ``paths.jaccard_matrix``).
* Mean pairwise Jaccard uses at most ``max_pairwise`` images (default
  5,000; an N x N similarity, computed in chunks); the within-class mean
  excludes the pairs of an image with itself.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot,
no global backend switch) and written atomically like every artifact.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_write_bytes, atomic_write_json
from .paths import extract_paths, jaccard_matrix, split_layers

DEFAULT_N = 2000
DEFAULT_OUTPUT = "reports/explain"
DEFAULT_TOP_K = 5
DEFAULT_DPI = 110
COLOUR_LABEL = "P(filter on | class)"
EXPLAIN_VERSION = 1


# ------------------------------------------------------------ computation


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
                "on_frequency": _num(filled[c, offset + j]),
                "others_mean": _num(filled[c, offset + j] - s[j]),
                "specificity": _num(s[j]),
            } for j in order])
        result.append(per_layer)
    return result


def layer_jaccard(bits: np.ndarray, reference: np.ndarray, widths: list[int]) -> np.ndarray:
    """Per-layer Jaccard similarity of binary rows ``bits`` (N, D) to
    ``reference`` (N, D) or (D,): (N, L).  Two empty sets count as 1."""
    bits = np.atleast_2d(bits).astype(bool)
    reference = np.broadcast_to(np.atleast_2d(reference).astype(bool), bits.shape)
    out, offset = [], 0
    for width in widths:
        v, r = bits[:, offset:offset + width], reference[:, offset:offset + width]
        inter = (v & r).sum(1)
        union = (v | r).sum(1)
        out.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
        offset += width
    return np.stack(out, axis=1)


# ---------------------------------------------------------------- helpers


def _num(x, digits: int = 6):
    """A JSON-safe float: rounded, NaN -> None."""
    x = float(x)
    return None if np.isnan(x) else round(x, digits)


def _matrix(a: np.ndarray, digits: int = 6) -> list:
    return [[_num(x, digits) for x in row] for row in np.asarray(a)]


def _rows_or_null(a: np.ndarray, present: np.ndarray, digits: int = 6) -> list:
    return [[_num(x, digits) for x in row] if ok else None for row, ok in zip(np.asarray(a), present)]


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path, dpi: int) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _cmap(name: str = "viridis"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#d9d9d9")


def _class_labels(classes, counts) -> list[str]:
    return [f"{name} (n={int(n)})" for name, n in zip(classes, counts)]


# ----------------------------------------------------------------- figures


def plot_class_path_maps(on_freq, counts, classes, layers: list[LayerInfo], path: Path, dpi: int) -> Path:
    fig = _new_figure(12.0, 0.6 + 2.6 * len(layers) * max(1.0, len(classes) / 10))
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    image = None
    for ax, layer in zip(axes, layers):
        data = np.ma.masked_invalid(on_freq[:, layer.offset:layer.offset + layer.width])
        image = ax.imshow(data, aspect="auto", cmap=_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks(range(len(classes)), _class_labels(classes, counts), fontsize=8)
        ax.set_xlabel(f"filter index in {layer.name}")
        ax.set_ylabel("predicted class")
        ax.set_title(f"{layer.name}: {layer.width} gated filters")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(image, ax=list(axes), label=COLOUR_LABEL, shrink=0.9)
    fig.suptitle(f"Class path maps: on-frequency of each filter per predicted class ({int(counts.sum())} images)")
    return _save_png(fig, path, dpi)


def _annotated_heatmap(ax, matrix, labels, title, colour_label, fig):
    data = np.ma.masked_invalid(matrix)
    image = ax.imshow(data, cmap=_cmap("magma"), vmin=0.0, vmax=1.0)
    n = len(labels)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("class (predicted)")
    ax.set_ylabel("class (predicted)")
    ax.set_title(title)
    size = 7 if n <= 12 else 5
    for i in range(n):
        for j in range(n):
            value = matrix[i, j]
            text = "–" if np.isnan(value) else f"{value:.2f}"
            colour = "black" if np.isnan(value) or value > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)
    fig.colorbar(image, ax=ax, label=colour_label, shrink=0.8)


def plot_class_similarity(effective, pairwise, classes, path: Path, dpi: int) -> Path:
    panels = [(effective, "Jaccard of class effective paths\n(filters on for > 50% of the class, all layers)",
               "Jaccard similarity")]
    if pairwise is not None:
        panels.append((pairwise, "Mean Jaccard of individual paths\n(image pairs, self-pairs excluded)",
                       "mean Jaccard similarity"))
    side = 0.55 * len(classes) + 2.5
    fig = _new_figure(side * len(panels) + 0.5, side)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (matrix, title, label) in zip(axes, panels):
        _annotated_heatmap(ax, matrix, list(classes), title, label, fig)
    fig.suptitle("Class-to-class path similarity")
    return _save_png(fig, path, dpi)


def plot_specific_filters(table, classes, counts, layers: list[LayerInfo], k: int, path: Path, dpi: int) -> Path:
    """A table: rows = classes, columns = layers, each cell the top-k
    filters as 'f<index>  +<specificity>'."""
    n_rows, n_cols = len(classes), len(layers)
    line_h = 0.16
    row_h = line_h * max(k, 1) + 0.12
    header_h, label_w, col_w = 0.45, 2.0, 1.7
    width, height = label_w + col_w * n_cols + 0.3, header_h + row_h * n_rows + 0.9
    fig = _new_figure(width, height)
    fig.set_layout_engine(None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    top = 0.55
    ax.text(width / 2, 0.22, f"Filters most specific to each class (top {k} per layer)",
            ha="center", va="center", fontsize=11, weight="bold")
    ax.text(width / 2, height - 0.2, "entry: filter index in the layer, specificity = P(on | class) "
            "− mean P(on | other classes)", ha="center", va="center", fontsize=8, style="italic")
    ax.text(0.1, top + header_h / 2, "predicted class", fontsize=9, weight="bold", va="center")
    for j, layer in enumerate(layers):
        ax.text(label_w + col_w * (j + 0.5), top + header_h / 2, f"{layer.name} ({layer.width})",
                ha="center", va="center", fontsize=9, weight="bold")
    ax.plot([0.05, width - 0.05], [top + header_h, top + header_h], color="black", lw=0.8)
    for i, (name, n) in enumerate(zip(classes, counts)):
        y0 = top + header_h + i * row_h
        if i % 2 == 0:
            ax.fill_between([0.05, width - 0.05], y0, y0 + row_h, color="#f0f0f0", lw=0)
        ax.text(0.1, y0 + row_h / 2, f"{name}\n(n={int(n)})", fontsize=8, va="center")
        for j in range(n_cols):
            entries = table[i][j]
            text = "\n".join(f"f{e['filter']:<4d}{e['specificity']:+.2f}" for e in entries) or "–"
            ax.text(label_w + col_w * (j + 0.5), y0 + row_h / 2, text, ha="center", va="center",
                    fontsize=7.5, family="monospace", linespacing=1.15)
    return _save_png(fig, path, dpi)


def _show_image(ax, image: np.ndarray) -> None:
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(np.clip(np.transpose(image, (1, 2, 0)), 0.0, 1.0))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_image_path(record: dict, image: np.ndarray, layers: list[LayerInfo], path: Path, dpi: int) -> Path:
    n_layers = len(layers)
    fig = _new_figure(13.0, 1.3 * n_layers + 3.2)
    grid = fig.add_gridspec(n_layers + 1, 2, width_ratios=(1.0, 3.6), height_ratios=[1.0] * n_layers + [2.2])
    ax_img = fig.add_subplot(grid[:n_layers, 0])
    _show_image(ax_img, image)
    title = [f"image {record['image_index']}" if record["image_index"] is not None else "image"]
    if record.get("label_name") is not None:
        title.append(f"true: {record['label_name']}")
    title.append(f"predicted: {record['predicted_name']} (p={record['confidence']:.2f})")
    ax_img.set_title("\n".join(title), fontsize=9)

    strip = None
    for row, (layer, info) in enumerate(zip(layers, record["layers"])):
        ax = fig.add_subplot(grid[row, 1])
        bits = np.array(info["bits"], dtype=float)
        freq = np.array([np.nan if x is None else x for x in (info["class_on_frequency"] or [None] * layer.width)])
        strip = ax.imshow(np.ma.masked_invalid(np.vstack([bits, freq])), aspect="auto", cmap=_cmap(),
                          vmin=0.0, vmax=1.0, interpolation="nearest")
        if info["class_effective_path"] is not None:
            differ = np.flatnonzero(bits.astype(bool) != np.array(info["class_effective_path"], dtype=bool))
            ax.plot(differ, np.zeros_like(differ), "o", ms=3.5, mfc="none", mec="red", mew=0.9,
                    label="differs from class path")
        ax.set_yticks([0, 1], ["image", "class"], fontsize=8)
        ax.set_xlim(-0.5, layer.width - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(axis="x", labelsize=7)
        deviation = info["deviation"]
        versus = ("no class path" if deviation is None else
                  f"{info['active_in_class_path']} in class path; deviation {deviation:.2f}")
        ax.set_title(f"{layer.name}: {info['active_in_image']}/{layer.width} on in image, {versus}",
                     fontsize=8.5, loc="left")
        if row == n_layers - 1:
            ax.set_xlabel("filter index (red circle: image bit differs from the class effective path)", fontsize=8)
    fig.colorbar(strip, ax=fig.axes[1:], label="image: gate bit;  class: " + COLOUR_LABEL, shrink=0.9)

    ax_bar = fig.add_subplot(grid[n_layers, 1])
    names = [layer.name for layer in layers]
    deviations = [np.nan if x["deviation"] is None else x["deviation"] for x in record["layers"]]
    worst = set(record["most_deviating_layers"])
    colours = ["#d62728" if name in worst else "#1f77b4" for name in names]
    ax_bar.bar(names, np.nan_to_num(deviations), color=colours, label="this image")
    typical = [np.nan if x["class_median_deviation"] is None else x["class_median_deviation"] for x in record["layers"]]
    ax_bar.plot(names, typical, "kD", ms=6, label="median of the class's images")
    for x, value in enumerate(deviations):
        if not np.isnan(value):
            ax_bar.text(x, value + 0.02, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    ax_bar.set_ylim(0, 1.32)
    ax_bar.set_yticks(np.linspace(0, 1, 6))
    ax_bar.set_ylabel("1 − Jaccard to class path")
    ax_bar.set_xlabel("gated layer")
    ax_bar.legend(fontsize=8, loc="upper center", ncols=2, frameon=False)
    worst_text = ", ".join(record["most_deviating_layers"]) or "none"
    if record["class_images"] == 0:
        heading = f"No chosen image was predicted as {record['predicted_name']}: no class path to compare with"
    else:
        heading = f"Per-layer deviation from the {record['predicted_name']} path; deviates most in (red): {worst_text}"
    ax_bar.set_title(heading, fontsize=9)

    ax_note = fig.add_subplot(grid[n_layers, 0])
    ax_note.axis("off")
    overall = record["overall_deviation"]
    ax_note.text(0.0, 0.5, f"whole path: {record['active_in_image']}/{record['path_bits']} gates on\n"
                 f"deviation over all layers: {'n/a' if overall is None else f'{overall:.2f}'}\n"
                 f"class images: {record['class_images']}", fontsize=9, va="center")
    fig.suptitle("Calculation path of one image against its predicted class")
    return _save_png(fig, path, dpi)


# --------------------------------------------------------------- pipeline


def image_record(model, image: torch.Tensor, on_freq: np.ndarray, counts: np.ndarray, batch_paths: np.ndarray,
                 batch_pred: np.ndarray, classes, layers: list[LayerInfo], image_index=None, image_label=None,
                 n_worst: int = 2) -> dict:
    """The JSON of (d): one image's path against its predicted class path."""
    single = extract_paths(model, image.unsqueeze(0))
    probs = torch.softmax(single.logits, dim=1)[0]
    pred = int(probs.argmax())
    bits = single.paths[0].numpy() > 0.5
    widths = [layer.width for layer in layers]
    has_class = counts[pred] > 0
    class_freq = on_freq[pred] if has_class else None
    class_path = effective_paths(on_freq)[pred] if has_class else None
    if has_class:
        jac = layer_jaccard(bits, class_path, widths)[0]
        overall = float(layer_jaccard(bits, class_path, [sum(widths)])[0, 0])
        own = batch_paths[batch_pred == pred] > 0.5
        own_dev = 1.0 - layer_jaccard(own, class_path, widths)
        median_dev = np.median(own_dev, axis=0)
    else:
        jac, overall, median_dev = np.full(len(layers), np.nan), np.nan, np.full(len(layers), np.nan)
    deviation = 1.0 - jac
    per_layer = []
    for i, layer in enumerate(layers):
        sl = slice(layer.offset, layer.offset + layer.width)
        b = bits[sl]
        entry = {**layer.to_json(), "bits": b.astype(int).tolist(),
                 "active_in_image": int(b.sum()),
                 "class_on_frequency": None, "class_effective_path": None, "active_in_class_path": None,
                 "jaccard": _num(jac[i]), "deviation": _num(deviation[i]),
                 "class_median_deviation": _num(median_dev[i]),
                 "excess_over_class_median": _num(deviation[i] - median_dev[i]),
                 "extra_filters": None, "missing_filters": None}
        if has_class:
            r = class_path[sl]
            entry.update({
                "class_on_frequency": [_num(x) for x in class_freq[sl]],
                "class_effective_path": r.astype(int).tolist(),
                "active_in_class_path": int(r.sum()),
                "extra_filters": np.flatnonzero(b & ~r).tolist(),    # on here, off in the class path
                "missing_filters": np.flatnonzero(~b & r).tolist(),  # off here, on in the class path
            })
        per_layer.append(entry)
    ranked = [i for i in np.argsort(-np.nan_to_num(deviation, nan=-1.0), kind="stable") if deviation[i] > 0]
    return {
        "image_index": image_index,
        "label": None if image_label is None else int(image_label),
        "label_name": None if image_label is None else classes[int(image_label)],
        "predicted": pred,
        "predicted_name": classes[pred],
        "confidence": _num(probs[pred]),
        "class_images": int(counts[pred]),
        "path_bits": int(bits.size),
        "active_in_image": int(bits.sum()),
        "overall_jaccard": _num(overall),
        "overall_deviation": _num(1.0 - overall),
        "layers": per_layer,
        "most_deviating_layers": [layers[i].name for i in ranked[:n_worst]],
        "deviation_rule": "1 - Jaccard(image bits, class effective path) per layer; the most deviating layers are "
                          f"the (up to {n_worst}) layers of largest deviation above 0",
    }


def explain(bundle, images: torch.Tensor, labels: torch.Tensor | None, image: torch.Tensor | None,
            output_dir, *, image_index: int | None = None, image_label: int | None = None,
            top_k: int = DEFAULT_TOP_K, dpi: int = DEFAULT_DPI, max_pairwise: int = 5000,
            source: dict | None = None) -> dict:
    """Write the interpretation figures and JSON of ``bundle``'s decoupled
    network on ``images`` (N, C, H, W) in [0, 1] into ``output_dir``.

    ``labels`` (optional) only adds the accuracy to the summary; grouping is
    by predicted class.  ``image`` (C, H, W), if given, gets the single-image
    figure (d).  Returns {"output_dir", "files": {key: path}, "summary"}.
    """
    if len(images) == 0:
        raise ValueError("explain needs at least one image")
    started = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.decoupled.eval()
    classes = tuple(bundle.classes)
    num_classes = len(classes)
    layers = gated_layers(model)
    widths = [layer.width for layer in layers]

    batch = extract_paths(model, images)
    pred = batch.predictions
    on_freq, counts = class_on_frequency(batch.paths, pred, num_classes)
    present = counts > 0
    files: dict[str, str] = {}

    def write_json(key: str, name: str, obj: dict) -> None:
        files[key] = str(atomic_write_json(out / name, {"version": EXPLAIN_VERSION, **obj}))

    common = {"classes": list(classes), "class_counts": counts.tolist(), "images": len(images),
              "grouping": "predicted class"}
    layer_json = [layer.to_json() for layer in layers]

    # (a) class path maps
    write_json("class_path_maps_json", "class_path_maps.json", {
        **common, "colour_label": COLOUR_LABEL,
        "layers": [{**layer.to_json(),
                    "on_frequency": _rows_or_null(on_freq[:, layer.offset:layer.offset + layer.width], present),
                    "active_fraction": [_num(np.mean(r)) for r in on_freq[:, layer.offset:layer.offset + layer.width]],
                    "effective_path_size": [int(r.sum()) if ok else None for r, ok in zip(
                        effective_paths(on_freq)[:, layer.offset:layer.offset + layer.width], present)]}
                   for layer in layers],
        "note": "on_frequency[c][j] = fraction of the images predicted as class c whose filter j of the layer is on; "
                "null rows: no image was predicted as that class",
    })
    files["class_path_maps_png"] = str(plot_class_path_maps(on_freq, counts, classes, layers,
                                                            out / "class_path_maps.png", dpi))

    # (b) class similarity
    effective = effective_path_similarity(on_freq)
    per_layer = effective_path_similarity(on_freq, widths)
    used = min(len(images), max_pairwise)
    pairwise = pairwise_class_jaccard(batch.paths[:used], pred[:used], num_classes) if used > 1 else None
    write_json("class_similarity_json", "class_similarity.json", {
        **common,
        "effective_path_jaccard": _matrix(effective),
        "effective_path_jaccard_per_layer": [{**lj, "matrix": _matrix(m)} for lj, m in zip(layer_json, per_layer)],
        "mean_pairwise_path_jaccard": None if pairwise is None else _matrix(pairwise),
        "pairwise_images": used if pairwise is not None else 0,
        "note": "effective path of a class: filters on for more than half of its images; Jaccard over all gated "
                "layers unless per layer; mean pairwise: mean Jaccard of the individual paths of image pairs "
                "(self-pairs excluded); null: a class without images (or pairs)",
    })
    files["class_similarity_png"] = str(plot_class_similarity(effective, pairwise, classes,
                                                              out / "class_similarity.png", dpi))

    # (c) specific filters
    table = specific_filters(on_freq, widths, top_k)
    write_json("specific_filters_json", "specific_filters.json", {
        **common, "k": top_k, "layers": layer_json,
        "top_filters": {name: {layer.name: table[c][j] for j, layer in enumerate(layers)}
                        for c, name in enumerate(classes)},
        "rule": "specificity = P(on | class) - unweighted mean of P(on | c') over the other classes with images; "
                "top k per class and layer, ties to the lower filter index; classes without images: empty lists",
    })
    files["specific_filters_png"] = str(plot_specific_filters(table, classes, counts, layers, top_k,
                                                              out / "specific_filters.png", dpi))

    # (d) one image
    record = None
    if image is not None:
        record = image_record(model, image, on_freq, counts, batch.paths.numpy(), pred.numpy(), classes, layers,
                              image_index, image_label)
        stem = f"image_{image_index}_path" if image_index is not None else "image_path"
        write_json("image_path_json", f"{stem}.json", record)
        files["image_path_png"] = str(plot_image_path(record, image.numpy(), layers, out / f"{stem}.png", dpi))

    summary = {
        "images": len(images),
        "accuracy": None if labels is None else _num((pred == labels).float().mean()),
        "class_counts": dict(zip(classes, counts.tolist())),
        "gated_layers": layer_json,
        "mean_active_fraction": _num(batch.paths.float().mean()),
        "image": None if record is None else {k: record[k] for k in (
            "image_index", "label_name", "predicted_name", "overall_deviation", "most_deviating_layers")},
    }
    files["summary_json"] = str(out / "explain.json")
    atomic_write_json(out / "explain.json", {
        "version": EXPLAIN_VERSION, "source": source or {}, "top_k": top_k, "dpi": dpi,
        "summary": summary, "files": {k: Path(v).name for k, v in files.items()},
        "wall_seconds": round(time.time() - started, 3),
    })
    return {"output_dir": str(out), "files": files, "summary": summary}


# -------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from .bundle import DEFAULT_BUNDLE

    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle directory (default: the shipped one)")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: fashion-mnist)")
    parser.add_argument("--data-root", default=None, help="dataset directory (default: the dataset's own)")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="(default: test)")
    parser.add_argument("--n", type=_positive_int, default=DEFAULT_N,
                        help=f"class statistics from the first N images of the split (default: {DEFAULT_N})")
    parser.add_argument("--image-index", type=_non_negative_int, default=0,
                        help="index in the split of the image to explain (default: 0)")
    parser.add_argument("--top-k", type=_positive_int, default=DEFAULT_TOP_K,
                        help=f"most specific filters per class and layer (default: {DEFAULT_TOP_K})")
    parser.add_argument("--dpi", type=_positive_int, default=DEFAULT_DPI, help=f"(default: {DEFAULT_DPI})")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output directory (default: {DEFAULT_OUTPUT}/)")


def run(args: argparse.Namespace) -> dict:
    from .bundle import load_bundle
    from .data import DatasetError, load_dataset

    bundle = load_bundle(args.bundle)
    data = load_dataset(args.dataset, args.split, args.data_root)
    if data.shape != bundle.input_shape:
        raise DatasetError(f"{args.dataset} images are {data.shape}, the bundle expects {bundle.input_shape}")
    if args.image_index >= len(data):
        raise DatasetError(f"--image-index {args.image_index} is outside the {args.split} split "
                           f"({len(data)} images)")
    chosen = data.head(args.n)
    source = {"bundle": str(bundle.path), "bundle_digest": bundle.digest, "dataset": args.dataset,
              "split": args.split, "n": len(chosen), "selection": f"first {len(chosen)} images of the split",
              "image_index": args.image_index}
    result = explain(bundle, chosen.images, chosen.labels, data.images[args.image_index], args.output,
                     image_index=args.image_index, image_label=int(data.labels[args.image_index]),
                     top_k=args.top_k, dpi=args.dpi, source=source)
    image = result["summary"]["image"]
    print(f"explained {len(chosen)} {args.split} images; image {args.image_index}: "
          f"predicted {image['predicted_name']} (true {image['label_name']}), deviates most in "
          f"{', '.join(image['most_deviating_layers']) or 'no layer'}")
    for key, path in result["files"].items():
        print(f"  {key:22s} {path}")
    return result
