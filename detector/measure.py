"""The figures a model card reports, measured the same way everywhere:
accuracy and active-gate ratio, path statistics, executed MACs, and the
software versions a result was produced with."""

from __future__ import annotations

import platform

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from .acceleration import flop_summary_from_gates
from .data import ImageSet
from .models import ConvNet
from .paths import PathBatch, class_jaccard, observe, split_layers, summarise_paths

# The linear probes of path quality are fitted on this many clean training
# images (class-stratified, seeded): enough for a 256-bit layer, seconds to fit.
PROBE_TRAIN_IMAGES = 20000


def evaluate_accuracy(model: ConvNet, data: ImageSet, batch_size: int = 1000) -> dict:
    """Accuracy (and, for the gated net, mean active ratio) in inference mode."""
    batch = observe(model, data.images, batch_size)
    out = {"accuracy": _accuracy(batch, data.labels)}
    if model.gated:
        out["active_ratio"] = float(batch.paths.double().mean())
    return out


def _layers(batch: PathBatch) -> list[np.ndarray]:
    """Each gated layer's binary path, then the whole path."""
    return [p.numpy() for p in split_layers(batch.paths, batch.widths)] + [batch.paths.numpy()]


def path_probes(fit: PathBatch, fit_labels: torch.Tensor, evaluations: dict[str, tuple[PathBatch, torch.Tensor]],
                num_classes: int) -> dict:
    """How much of the class each gated layer's binary path carries: a
    multinomial logistic regression (scikit-learn, default L2 strength)
    fitted on the paths of clean training images (``fit``) and scored on
    each evaluation set.  The last entry of each list is the whole path
    (all layers concatenated).  Chance is 1 / classes."""
    x_fit, y_fit = _layers(fit), torch.as_tensor(fit_labels).cpu().numpy()
    if len(np.unique(y_fit)) < 2:  # e.g. --limit-train on a folder listed class by class
        return {"fit_images": len(fit), "layers": len(x_fit) - 1, "chance": 1.0 / num_classes,
                "accuracy": {name: None for name in evaluations},
                "note": "not measured: the probe's training images hold fewer than 2 classes"}
    scored = {name: (_layers(batch), torch.as_tensor(y).cpu().numpy()) for name, (batch, y) in evaluations.items()}
    accuracy: dict[str, list[float]] = {name: [] for name in evaluations}
    for layer in range(len(x_fit)):
        probe = LogisticRegression(max_iter=1000).fit(x_fit[layer], y_fit)
        for name, (x, y) in scored.items():
            accuracy[name].append(float(probe.score(x[layer], y)))
    return {"fit_images": len(fit), "layers": len(x_fit) - 1, "chance": 1.0 / num_classes,
            "accuracy": accuracy, "note": "per gated layer, input to output, then the whole path"}


def layer_jaccard_summary(batch: PathBatch, labels: torch.Tensor) -> list[dict]:
    """Per gated layer: mean Jaccard similarity of two images' paths within
    a class and between classes (a layer whose paths carry the class has
    within >> between)."""
    labels = torch.as_tensor(labels).cpu()
    return [class_jaccard(p, labels) for p in split_layers(batch.paths, batch.widths)]


def path_quality(model: ConvNet, train: ImageSet, observed: dict[str, tuple[PathBatch, torch.Tensor]],
                 n_train: int = PROBE_TRAIN_IMAGES, seed: int = 0) -> dict:
    """The path-quality figures of a model card (docs/method.md): linear
    probes fitted on ``n_train`` clean training images (class-stratified,
    seeded) and scored on the ``observed`` sets; per-layer class Jaccard on
    the test split."""
    fit_set = train.to("cpu").sample(min(n_train, len(train)), seed, shrink=True)
    test_batch, test_labels = observed["test"]
    return {"probe": path_probes(observe(model, fit_set.images), fit_set.labels, observed, model.arch.num_classes),
            "jaccard_per_layer_test": layer_jaccard_summary(test_batch, test_labels)}


def _accuracy(batch: PathBatch, labels: torch.Tensor) -> float:
    return float((batch.predictions == torch.as_tensor(labels).cpu()).double().mean())


def measure_card(decoupled: ConvNet, plain: ConvNet, test: ImageSet, val: ImageSet | None,
                 train: ImageSet | None = None) -> dict:
    """Side-by-side figures of the two nets on the test split (reported,
    never used for a choice) and on the validation split; with ``train``,
    also the path-quality figures (linear probes fitted on it).  Each net
    sees each set once."""
    test_batch = observe(decoupled, test.images)
    test_paths = summarise_paths(test_batch, test.labels)
    plain_test = _accuracy(observe(plain, test.images), test.labels)
    first = min(1000, len(test))
    card = {
        "test": {
            "images": len(test),
            "decoupled_accuracy": test_paths["accuracy"],
            "plain_accuracy": plain_test,
            "accuracy_gap_points": 100 * (plain_test - test_paths["accuracy"]),
            "active_fraction": test_paths["active_fraction"],
            "distinct_paths": test_paths["distinct_paths"],
            "path_bits": test_paths["path_bits"],
            "jaccard": test_paths["jaccard"],
            "first_1000_decoupled_accuracy": _accuracy(test_batch.subset(torch.arange(first)), test.labels[:first]),
            "flops": flop_summary_from_gates(decoupled, split_layers(test_batch.paths, test_batch.widths),
                                             test.images.shape[1:]),
        },
        "gated_widths": decoupled.gated_widths,
    }
    observed = {"test": (test_batch, test.labels)}
    if val is not None:
        val_batch = observe(decoupled, val.images)
        observed["validation"] = (val_batch, val.labels)
        card["validation"] = {
            "images": len(val),
            "decoupled_accuracy": _accuracy(val_batch, val.labels),
            "plain_accuracy": _accuracy(observe(plain, val.images), val.labels),
            "active_fraction": float(val_batch.paths.double().mean()),
            "mac_ratio_vs_plain": flop_summary_from_gates(decoupled, split_layers(val_batch.paths, val_batch.widths),
                                                          val.images.shape[1:])["ratio_vs_plain"],
        }
    if train is not None:
        card["path_quality"] = path_quality(decoupled, train, observed)
    return card


def path_class_term(history: list[dict], num_classes: int) -> dict:
    """The path-class (mutual-information surrogate) cross-entropy of each
    gated layer over the last decoupled training epoch, beside its chance
    level ln(classes): a term that trained ends far below chance."""
    if not history:
        return {}
    last = history[-1]
    keys = sorted((k for k in last if k.startswith("train_mi_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return {"epoch": last["epoch"], "per_layer": [last[k] for k in keys], "sum": last.get("train_mi"),
            "chance_per_layer": float(np.log(num_classes))}


def versions() -> dict:
    """Software and machine a result was produced with (for reports)."""
    import safetensors
    import sklearn

    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "scikit-learn": sklearn.__version__, "safetensors": safetensors.__version__,
        "machine": platform.machine(), "threads": torch.get_num_threads(),
    }
