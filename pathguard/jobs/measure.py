"""`pathguard measure` and `pathguard info`: a bundle's figures.

``measure`` re-measures the test figures of a bundle (both nets side by
side: accuracy, sparsity, paths, MACs) into its model card; ``info``
verifies a bundle and prints what it holds."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pathguard.detector.bundle import load_bundle, update_bundle_card
from pathguard.detector.devices import resolve_device
from pathguard.detector.measure import measure_card, path_class_term

from .config import BundleOptions, DEFAULT_BUNDLE_TEXT, check, device_option, option
from .data import data_spec, load_for, train_validation


@dataclass
class Config(BundleOptions):
    """A bundle and the data to measure it on (default: the bundle's)."""
    device: str = device_option()


def run(cfg: Config) -> dict:
    check(cfg)
    bundle = load_bundle(cfg.bundle).to(resolve_device(cfg.device))
    spec = data_spec(bundle, cfg.dataset, cfg.data_root)
    test = load_for(bundle, spec, "test")
    train, val = train_validation(bundle, spec)
    card = measure_card(bundle.decoupled, bundle.plain, test, val, train=train)
    card["path_class_term_end"] = path_class_term(bundle.training.get("history", {}).get("decoupled", []),
                                                  bundle.arch.num_classes)
    update_bundle_card(bundle.path, {k: card[k] for k in ("test", "validation", "path_quality",
                                                         "path_class_term_end")})
    # the test figures at the top level (as before), path quality beside them
    print(json.dumps({**card["test"], "path_quality": card["path_quality"],
                      "path_class_term_end": card["path_class_term_end"]}, indent=2))
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
