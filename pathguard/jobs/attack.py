"""`pathguard attack`: generate the attack sets of the evaluation protocol.

    pathguard attack --attack pgd cw --n 2000 --set pgd.steps=20

Loads the bundle's decoupled network in inference mode, takes the first N
images of the split that it classifies correctly (docs/evaluation.md), attacks
them with each named preset and writes ``<output>/<attack>/`` (see
``attacks.generate`` for the files).  Each set records the bundle digest,
dataset, split and the images' indices in the split, so the evaluation can
check that a set belongs to the model it scores.

Overrides: ``--set KEY=VALUE`` (repeatable).  ``KEY`` is either
``attack.param`` (one attack) or ``param`` (every selected attack that has
that parameter; an error if none has it).  Values are parsed to the
parameter's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathguard.attacks.generate import DEFAULT_BATCH_SIZE, generate_attack_set, save_attack_set
from pathguard.attacks.presets import ALL_PRESETS, PRESETS, parse_override
from pathguard.detector.bundle import load_bundle
from pathguard.detector.devices import resolve_device
from pathguard.detector.paths import correct_mask
from pathguard.detector.splits import stratified_sample

from .config import BundleOptions, check, device_option, option
from .data import data_spec, load_for


@dataclass
class Config(BundleOptions):
    device: str = device_option()
    split: str = option("test", "split to attack", choices=("train", "test"))
    attack: tuple = option(("all",), "attacks to run, or 'all' (the protocol's; the extra presets, "
                          "e.g. pgd-bpda, by name)", choices=(*ALL_PRESETS, "all"))
    n: int = option(2000, "attack N correctly classified images (class-stratified, seeded)", minimum=1)
    seed: int = option(0, "seed of the image sample and the attacks' random starts")
    batch_size: int = option(DEFAULT_BATCH_SIZE, "images per attack batch", minimum=1)
    overrides: tuple = option((), "KEY=VALUE: override a preset parameter, attack.param=value or param=value "
                              "(repeatable)", kind=str, flag="--set", repeat=True)
    output: str = option("attacksets", "output directory (one folder per attack)")
    progress: bool = option(True, "progress bars")


def select_correct(model, images: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (int64, ascending) of ``n`` images that ``model`` classifies
    correctly in inference mode, drawn class-stratified and seeded.  Fewer
    than ``n`` come back when the set holds fewer; the caller decides
    whether that is acceptable."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    index = stratified_sample(labels, n, seed, correct_mask(model, images, labels), shrink=True)
    return index.sort().values.to(torch.int64)


def resolve_attacks(names: list[str]) -> list[str]:
    """Expand 'all' and drop repeats, keeping the order given."""
    resolved: list[str] = []
    for name in names:
        for item in (PRESETS if name == "all" else [name]):
            if item not in ALL_PRESETS:
                raise ValueError(f"unknown attack {item!r}; choose one of {[*ALL_PRESETS, 'all']}")
            if item not in resolved:
                resolved.append(item)
    return resolved


def parse_overrides(pairs: list[str], attacks: list[str]) -> dict[str, dict[str, Any]]:
    """Map ``--set`` strings to per-attack override dicts (see module docstring)."""
    overrides: dict[str, dict[str, Any]] = {name: {} for name in attacks}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        if "." in key:
            name, _, param = key.partition(".")
            if name not in overrides:
                raise ValueError(f"--set {pair!r}: attack {name!r} is not among the selected attacks {attacks}")
            overrides[name][param] = parse_override(name, param, text)
        else:
            targets = [name for name in attacks if key in ALL_PRESETS[name].params]
            if not targets:
                valid = sorted({p for name in attacks for p in ALL_PRESETS[name].params})
                raise ValueError(f"--set {pair!r}: no selected attack has parameter {key!r}; valid: {valid}")
            for name in targets:
                overrides[name][key] = parse_override(name, key, text)
    return overrides


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run(cfg: Config) -> None:
    try:
        check(cfg)
        attacks = resolve_attacks(list(cfg.attack))
        overrides = parse_overrides(list(cfg.overrides), attacks)
    except ValueError as exc:
        raise SystemExit(f"pathguard attack: error: {exc}") from None
    bundle = load_bundle(cfg.bundle).to(resolve_device(cfg.device))
    model = bundle.decoupled.eval()
    spec = data_spec(bundle, cfg.dataset, cfg.data_root)
    data = load_for(bundle, spec, cfg.split)
    indices = select_correct(model, data.images, data.labels, cfg.n, cfg.seed)
    if len(indices) < cfg.n:
        print(f"note: only {len(indices)} correctly classified images in {spec.dataset}/{cfg.split} "
              f"(asked for {cfg.n})")
    images, labels = data.images[indices], data.labels[indices]
    source = {
        "bundle": str(bundle.path), "bundle_digest": bundle.digest, "model_digest": bundle.model_digest,
        "dataset": spec.dataset, "split": cfg.split, "n_requested": cfg.n,
        "selection": "N images of the split the model classifies correctly, class-stratified and seeded",
    }
    for name in attacks:
        attack_set = generate_attack_set(model, images, labels, name, seed=cfg.seed, batch_size=cfg.batch_size,
                                         overrides=overrides[name], progress=cfg.progress)
        attack_set.indices = indices.clone()
        attack_set.source = source
        path = save_attack_set(attack_set, Path(cfg.output) / name)
        _print_set(name, attack_set, path)


def _print_set(name: str, attack_set, path: Path) -> None:
    norms = attack_set.mean_norms(successful_only=True)
    rate = attack_set.success_rate
    print(
        f"{name:<9} success {_fmt(None if rate is None else 100 * rate, '5.1f')}% "
        f"({attack_set.n_success}/{attack_set.n_correct})  "
        f"mean L2 {_fmt(norms['l2'], '.3f')}  mean Linf {_fmt(norms['linf'], '.3f')}  "
        f"{attack_set.wall_time:.1f} s  -> {path}"
    )
