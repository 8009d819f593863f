"""`pathguard measure` and `pathguard info`: a bundle's figures.

``measure`` re-measures the test figures of a bundle (both nets side by
side: accuracy, sparsity, paths, MACs) into its model card; ``info``
verifies a bundle and prints what it holds."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pathguard.detector.bundle import load_bundle, update_bundle_card
from pathguard.detector.data import DATASETS, load_dataset
from pathguard.detector.measure import measure_card

from .config import DEFAULT_BUNDLE_TEXT, check, option


@dataclass
class Config:
    bundle: str = option(DEFAULT_BUNDLE_TEXT, "bundle directory")
    dataset: str = option("fashion-mnist", "dataset name", choices=DATASETS)
    data_root: str | None = option(None, "dataset directory (default: the dataset's own)", kind=str)


def run(cfg: Config) -> dict:
    check(cfg)
    bundle = load_bundle(cfg.bundle)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    card = measure_card(bundle.decoupled, bundle.plain, test, None)
    update_bundle_card(bundle.path, {"test": card["test"]})
    print(json.dumps(card["test"], indent=2))
    return card


@dataclass
class InfoConfig:
    bundle: str = option(DEFAULT_BUNDLE_TEXT, "bundle directory")


def info(cfg: InfoConfig) -> dict:
    bundle = load_bundle(cfg.bundle)
    summary = {
        "bundle": str(bundle.path),
        "digest": bundle.digest,
        "architecture": bundle.arch.name,
        "input_shape": list(bundle.input_shape),
        "classes": list(bundle.classes),
        "gated_widths": bundle.decoupled.gated_widths,
        "model_card": bundle.card,
    }
    print(json.dumps(summary, indent=2))
    return summary
