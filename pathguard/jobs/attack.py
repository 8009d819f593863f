"""`pathguard attack`: generate the attack sets of the evaluation protocol.

    pathguard attack --attack pgd cw --n 2000 --set pgd.steps=20

Loads the bundle's decoupled network in inference mode, takes the first N
images of the split that it classifies correctly (design.md §3), attacks
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

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .generate import DEFAULT_BATCH_SIZE, generate_attack_set, predict, save_attack_set
from .presets import PRESETS, parse_override

DEFAULT_N = 2000
DEFAULT_OUTPUT = "attacksets"


def configure(parser: argparse.ArgumentParser) -> None:
    from pathguard.detector.bundle import DEFAULT_BUNDLE

    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle directory (default: the shipped one)")
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset name (default: fashion-mnist)")
    parser.add_argument("--data-root", default=None, help="dataset directory (default: the dataset's own)")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="(default: test)")
    parser.add_argument("--attack", nargs="+", default=["all"], choices=[*PRESETS, "all"], metavar="NAME",
                        help=f"one or more of {', '.join(PRESETS)}, or 'all' (default: all)")
    parser.add_argument("--n", type=int, default=DEFAULT_N,
                        help=f"attack the first N correctly classified images (default: {DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"(default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset parameter: attack.param=value or param=value (repeatable)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output directory (default: {DEFAULT_OUTPUT}/)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def select_correct(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n: int, batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Indices (int64, ascending) of the first ``n`` images that ``model``
    classifies correctly in inference mode.  Fewer than ``n`` come back when
    the set holds fewer; the caller decides whether that is acceptable."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    found: list[torch.Tensor] = []
    count = 0
    for start in range(0, len(images), batch_size):
        if count >= n:
            break
        preds = predict(model, images[start:start + batch_size], batch_size)
        hits = (preds == labels[start:start + batch_size].cpu()).nonzero().flatten() + start
        found.append(hits)
        count += len(hits)
    if not found:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(found)[:n].to(torch.int64)


def resolve_attacks(names: list[str]) -> list[str]:
    """Expand 'all' and drop repeats, keeping the order given."""
    resolved: list[str] = []
    for name in names:
        for item in (PRESETS if name == "all" else [name]):
            if item not in PRESETS:
                raise ValueError(f"unknown attack {item!r}; choose one of {[*PRESETS, 'all']}")
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
            targets = [name for name in attacks if key in PRESETS[name].params]
            if not targets:
                valid = sorted({p for name in attacks for p in PRESETS[name].params})
                raise ValueError(f"--set {pair!r}: no selected attack has parameter {key!r}; valid: {valid}")
            for name in targets:
                overrides[name][key] = parse_override(name, key, text)
    return overrides


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> None:
    from pathguard.detector.bundle import load_bundle
    from pathguard.detector.data import DatasetError, load_dataset

    try:
        attacks = resolve_attacks(args.attack)
        overrides = parse_overrides(args.overrides, attacks)
        if args.n < 1 or args.batch_size < 1:
            raise ValueError("--n and --batch-size must be positive")
    except ValueError as exc:
        raise SystemExit(f"pathguard attack: error: {exc}") from None

    bundle = load_bundle(args.bundle)
    model = bundle.decoupled.eval()
    data = load_dataset(args.dataset, args.split, args.data_root)
    if tuple(data.shape) != tuple(bundle.input_shape):
        raise DatasetError(f"{args.dataset}/{args.split} images are {data.shape}, the bundle expects {bundle.input_shape}")
    indices = select_correct(model, data.images, data.labels, args.n, args.batch_size)
    if len(indices) < args.n:
        print(f"note: only {len(indices)} correctly classified images in {args.dataset}/{args.split} (asked for {args.n})")
    images, labels = data.images[indices], data.labels[indices]
    source = {
        "bundle": str(bundle.path), "bundle_digest": bundle.digest,
        "dataset": args.dataset, "split": args.split, "n_requested": args.n,
        "selection": "first N images of the split the model classifies correctly",
    }

    output = Path(args.output)
    for name in attacks:
        attack_set = generate_attack_set(model, images, labels, name, seed=args.seed, batch_size=args.batch_size,
                                         overrides=overrides[name], progress=args.progress)
        attack_set.indices = indices.clone()
        attack_set.source = source
        path = save_attack_set(attack_set, output / name)
        norms = attack_set.mean_norms(successful_only=True)
        rate = attack_set.success_rate
        print(
            f"{name:<9} success {_fmt(None if rate is None else 100 * rate, '5.1f')}% "
            f"({attack_set.n_success}/{attack_set.n_correct})  "
            f"mean L2 {_fmt(norms['l2'], '.3f')}  mean Linf {_fmt(norms['linf'], '.3f')}  "
            f"{attack_set.wall_time:.1f} s  -> {path}"
        )
