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

Choices (docs/method.md asks for them to be written down):

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

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pathguard.detector.artifacts import atomic_write_bytes, atomic_write_json
from pathguard.detector.bundle import DETECTOR_CONFIG, load_bundle, load_detector
from pathguard.detector.inspection import Inspector
from pathguard.detector.data import DatasetError
from pathguard.detector.interpret import (
    DEFAULT_TOP_K, LayerInfo, class_on_frequency, effective_path_similarity, effective_paths, gated_layers,
    json_matrix, json_number, json_rows_or_null, pairwise_class_jaccard, specific_filters,
)
from pathguard.detector.paths import extract_paths, layer_jaccard

from .config import BundleOptions, check, option
from .data import data_spec, load_for

DEFAULT_N = 2000
DEFAULT_OUTPUT = "reports/explain"
DEFAULT_DPI = 110
COLOUR_LABEL = "P(filter on | class)"
EXPLAIN_VERSION = 1


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
    note = (f"whole path: {record['active_in_image']}/{record['path_bits']} gates on\n"
            f"deviation over all layers: {'n/a' if overall is None else f'{overall:.2f}'}\n"
            f"class images: {record['class_images']}")
    verdict = record.get("detector")
    if verdict:
        note += (f"\ndetector {verdict['detector']}: score {verdict['score']:.3g} "
                 f"({'flagged' if verdict['adversarial'] else 'not flagged'}, threshold {verdict['threshold']:.3g})"
                 f"\nmost deviating: {verdict['most_deviating']}\nearly path points to: {verdict['early_class']}")
    ax_note.text(0.0, 0.5, note, fontsize=8, va="center")
    fig.suptitle("Calculation path of one image against its predicted class")
    return _save_png(fig, path, dpi)


# --------------------------------------------------------------- pipeline


def detector_verdict(bundle, image: torch.Tensor) -> dict | None:
    """What the bundle's fitted detector says of the image, as /detect says
    it (detector.inspection): score, threshold, flag and the evidence (the
    most deviating check, every channel's p-value, the class each gated
    layer's path points to).  None for a bundle without a detector."""
    if not bundle.has_file(DETECTOR_CONFIG):
        return None
    detector = load_detector(bundle)
    answer = Inspector(bundle, detector).inspect(image.unsqueeze(0))[0]
    return {"score": answer.score, "threshold": answer.threshold, "adversarial": answer.adversarial,
            "detector": detector.name, **answer.evidence}



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
        reference = torch.from_numpy(class_path)
        jac = layer_jaccard(single.paths, reference, widths)[0].double().numpy()
        overall = float(layer_jaccard(single.paths, reference, [sum(widths)])[0, 0])
        own = torch.from_numpy(batch_paths[batch_pred == pred])
        own_dev = 1.0 - layer_jaccard(own, reference, widths).double().numpy()
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
                 "jaccard": json_number(jac[i]), "deviation": json_number(deviation[i]),
                 "class_median_deviation": json_number(median_dev[i]),
                 "excess_over_class_median": json_number(deviation[i] - median_dev[i]),
                 "extra_filters": None, "missing_filters": None}
        if has_class:
            r = class_path[sl]
            entry.update({
                "class_on_frequency": [json_number(x) for x in class_freq[sl]],
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
        "confidence": json_number(probs[pred]),
        "class_images": int(counts[pred]),
        "path_bits": int(bits.size),
        "active_in_image": int(bits.sum()),
        "overall_jaccard": json_number(overall),
        "overall_deviation": json_number(1.0 - overall),
        "layers": per_layer,
        "most_deviating_layers": [layers[i].name for i in ranked[:n_worst]],
        "deviation_rule": "1 - Jaccard(image bits, class effective path) per layer; the most deviating layers are "
                          f"the (up to {n_worst}) layers of largest deviation above 0",
    }


@dataclass
class _Context:
    """What every part of an explanation reads."""

    out: Path
    classes: tuple
    layers: list[LayerInfo]
    on_freq: np.ndarray
    counts: np.ndarray
    dpi: int
    files: dict

    @property
    def widths(self) -> list[int]:
        return [layer.width for layer in self.layers]

    @property
    def common(self) -> dict:
        return {"classes": list(self.classes), "class_counts": self.counts.tolist(),
                "images": int(self.counts.sum()), "grouping": "predicted class"}

    def write_json(self, key: str, name: str, obj: dict) -> None:
        self.files[key] = str(atomic_write_json(self.out / name, {"version": EXPLAIN_VERSION, **obj}))

    def layer_slice(self, layer: LayerInfo) -> np.ndarray:
        return self.on_freq[:, layer.offset:layer.offset + layer.width]


def _class_path_maps(ctx: _Context) -> None:
    """(a) per class and layer, the on-frequency of every filter."""
    present = ctx.counts > 0
    effective = effective_paths(ctx.on_freq)
    ctx.write_json("class_path_maps_json", "class_path_maps.json", {
        **ctx.common, "colour_label": COLOUR_LABEL,
        "layers": [{**layer.to_json(),
                    "on_frequency": json_rows_or_null(ctx.layer_slice(layer), present),
                    "active_fraction": [json_number(np.mean(r)) for r in ctx.layer_slice(layer)],
                    "effective_path_size": [int(r.sum()) if ok else None for r, ok in zip(
                        effective[:, layer.offset:layer.offset + layer.width], present)]}
                   for layer in ctx.layers],
        "note": "on_frequency[c][j] = fraction of the images predicted as class c whose filter j of the layer is on; "
                "null rows: no image was predicted as that class",
    })
    ctx.files["class_path_maps_png"] = str(plot_class_path_maps(
        ctx.on_freq, ctx.counts, ctx.classes, ctx.layers, ctx.out / "class_path_maps.png", ctx.dpi))


def _class_similarity(ctx: _Context, paths: torch.Tensor, pred: torch.Tensor, max_pairwise: int) -> None:
    """(b) class-to-class similarity of effective paths and of individual paths."""
    effective = effective_path_similarity(ctx.on_freq)
    per_layer = effective_path_similarity(ctx.on_freq, ctx.widths)
    used = min(len(paths), max_pairwise)
    pairwise = pairwise_class_jaccard(paths[:used], pred[:used], len(ctx.classes)) if used > 1 else None
    ctx.write_json("class_similarity_json", "class_similarity.json", {
        **ctx.common,
        "effective_path_jaccard": json_matrix(effective),
        "effective_path_jaccard_per_layer": [{**layer.to_json(), "matrix": json_matrix(m)}
                                             for layer, m in zip(ctx.layers, per_layer)],
        "mean_pairwise_path_jaccard": None if pairwise is None else json_matrix(pairwise),
        "pairwise_images": used if pairwise is not None else 0,
        "note": "effective path of a class: filters on for more than half of its images; Jaccard over all gated "
                "layers unless per layer; mean pairwise: mean Jaccard of the individual paths of image pairs "
                "(self-pairs excluded); null: a class without images (or pairs)",
    })
    ctx.files["class_similarity_png"] = str(plot_class_similarity(
        effective, pairwise, ctx.classes, ctx.out / "class_similarity.png", ctx.dpi))


def _specific_filters(ctx: _Context, top_k: int) -> None:
    """(c) the filters most specific to each class, per layer."""
    table = specific_filters(ctx.on_freq, ctx.widths, top_k)
    ctx.write_json("specific_filters_json", "specific_filters.json", {
        **ctx.common, "k": top_k, "layers": [layer.to_json() for layer in ctx.layers],
        "top_filters": {name: {layer.name: table[c][j] for j, layer in enumerate(ctx.layers)}
                        for c, name in enumerate(ctx.classes)},
        "rule": "specificity = P(on | class) - unweighted mean of P(on | c') over the other classes with images; "
                "top k per class and layer, ties to the lower filter index; classes without images: empty lists",
    })
    ctx.files["specific_filters_png"] = str(plot_specific_filters(
        table, ctx.classes, ctx.counts, ctx.layers, top_k, ctx.out / "specific_filters.png", ctx.dpi))


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
    batch = extract_paths(model, images)
    pred = batch.predictions
    on_freq, counts = class_on_frequency(batch.paths, pred, len(bundle.classes))
    ctx = _Context(out, tuple(bundle.classes), gated_layers(model), on_freq, counts, dpi, {})
    _class_path_maps(ctx)
    _class_similarity(ctx, batch.paths, pred, max_pairwise)
    _specific_filters(ctx, top_k)
    record = None
    if image is not None:  # (d) one image
        record = image_record(model, image, on_freq, counts, batch.paths.numpy(), pred.numpy(), ctx.classes,
                              ctx.layers, image_index, image_label)
        record["detector"] = detector_verdict(bundle, image)
        stem = f"image_{image_index}_path" if image_index is not None else "image_path"
        ctx.write_json("image_path_json", f"{stem}.json", record)
        ctx.files["image_path_png"] = str(plot_image_path(record, image.numpy(), ctx.layers,
                                                          out / f"{stem}.png", dpi))
    summary = {
        "images": len(images),
        "accuracy": None if labels is None else json_number((pred == labels).float().mean()),
        "class_counts": dict(zip(ctx.classes, counts.tolist())),
        "gated_layers": [layer.to_json() for layer in ctx.layers],
        "mean_active_fraction": json_number(batch.paths.float().mean()),
        "image": None if record is None else {k: record[k] for k in (
            "image_index", "label_name", "predicted_name", "overall_deviation", "most_deviating_layers")},
    }
    ctx.files["summary_json"] = str(out / "explain.json")
    atomic_write_json(out / "explain.json", {
        "version": EXPLAIN_VERSION, "source": source or {}, "top_k": top_k, "dpi": dpi,
        "summary": summary, "files": {k: Path(v).name for k, v in ctx.files.items()},
        "wall_seconds": round(time.time() - started, 3),
    })
    return {"output_dir": str(out), "files": ctx.files, "summary": summary}


# -------------------------------------------------------------------- CLI

@dataclass
class Config(BundleOptions):
    split: str = option("test", "split to read images from", choices=("train", "test"))
    n: int = option(DEFAULT_N, "class statistics from N images of the split, class-stratified", minimum=1)
    seed: int = option(0, "seed of the image sample")
    image_index: int = option(0, "index in the split of the image to explain", minimum=0)
    top_k: int = option(DEFAULT_TOP_K, "most specific filters per class and layer", minimum=1)
    dpi: int = option(DEFAULT_DPI, "figure resolution", minimum=1)
    output: str = option(DEFAULT_OUTPUT, "output directory")


def run(cfg: Config) -> dict:
    check(cfg)
    bundle = load_bundle(cfg.bundle)
    spec = data_spec(bundle, cfg.dataset, cfg.data_root)
    data = load_for(bundle, spec, cfg.split)
    if cfg.image_index >= len(data):
        raise DatasetError(f"--image-index {cfg.image_index} is outside the {cfg.split} split "
                           f"({len(data)} images)")
    chosen = data.sample(cfg.n, cfg.seed, shrink=True)
    source = {"bundle": str(bundle.path), "bundle_digest": bundle.digest, "dataset": spec.dataset,
              "split": cfg.split, "n": len(chosen),
              "selection": f"{len(chosen)} images of the split, class-stratified (seed {cfg.seed})",
              "image_index": cfg.image_index}
    result = explain(bundle, chosen.images, chosen.labels, data.images[cfg.image_index], cfg.output,
                     image_index=cfg.image_index, image_label=int(data.labels[cfg.image_index]),
                     top_k=cfg.top_k, dpi=cfg.dpi, source=source)
    image = result["summary"]["image"]
    print(f"explained {len(chosen)} {cfg.split} images; image {cfg.image_index}: "
          f"predicted {image['predicted_name']} (true {image['label_name']}), deviates most in "
          f"{', '.join(image['most_deviating_layers']) or 'no layer'}")
    for key, path in result["files"].items():
        print(f"  {key:22s} {path}")
    return result
