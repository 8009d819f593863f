"""The figures a model card reports, measured the same way everywhere:
accuracy and active-gate ratio, path statistics, executed MACs, and the
software versions a result was produced with."""

from __future__ import annotations

import platform

import numpy as np
import torch

from .acceleration import flop_summary
from .data import ImageSet
from .models import ConvNet
from .paths import observe, path_summary


def evaluate_accuracy(model: ConvNet, data: ImageSet, batch_size: int = 1000) -> dict:
    """Accuracy (and, for the gated net, mean active ratio) in inference mode."""
    batch = observe(model, data.images, batch_size)
    out = {"accuracy": float((batch.predictions == data.labels).double().mean())}
    if model.gated:
        out["active_ratio"] = float(batch.paths.double().mean())
    return out


def measure_card(decoupled: ConvNet, plain: ConvNet, test: ImageSet, val: ImageSet | None) -> dict:
    """Side-by-side figures of the two nets on the test split (reported,
    never used for a choice) and on the validation split."""
    test_paths = path_summary(decoupled, test.images, test.labels)
    plain_test = evaluate_accuracy(plain, test)["accuracy"]
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
            "first_1000_decoupled_accuracy": evaluate_accuracy(decoupled, test.head(1000))["accuracy"],
            "flops": flop_summary(decoupled, test.images),
        },
        "gated_widths": decoupled.gated_widths,
    }
    if val is not None:
        card["validation"] = {
            "images": len(val),
            "decoupled_accuracy": evaluate_accuracy(decoupled, val)["accuracy"],
            "plain_accuracy": evaluate_accuracy(plain, val)["accuracy"],
        }
    return card


def versions() -> dict:
    """Software and machine a result was produced with (for reports)."""
    import safetensors
    import sklearn

    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "scikit-learn": sklearn.__version__, "safetensors": safetensors.__version__,
        "machine": platform.machine(), "threads": torch.get_num_threads(),
    }
