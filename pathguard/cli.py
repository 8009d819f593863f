"""The `pathguard` command: one entry point for the whole pipeline.

    pathguard train     train plain + decoupled nets, write a bundle
    pathguard info      verify a bundle and print what it holds
    pathguard measure   re-measure a bundle's test figures into its card
    pathguard fit       fit the path scores, choose one on validation attacks, set the threshold
    pathguard attack    adversarial sets (FGSM, BIM, PGD, CW, DeepFool)
    pathguard evaluate  offline ROC evaluation against baselines
    pathguard adaptive  the detector-aware attack sweep
    pathguard explain   path interpretation figures
    pathguard serve     the HTTP service

Every command has one style: its options are the fields of its job's
``Config`` dataclass (pathguard/jobs/*.py), with the defaults and help
written there once; ``--field-name`` per field, ``--flag/--no-flag`` for
booleans, several values after one flag for lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

from pathguard.detector.artifacts import ArtifactError
from pathguard.detector.data import DatasetError

from .jobs import adaptive, attack, evaluate, explain, fit, measure, serve, train
from .jobs.config import value_kind

# name: (help, Config class, run function)
COMMANDS: dict[str, tuple[str, type, Callable]] = {
    "train": ("train the plain and decoupled networks and write a bundle", train.Config, train.run),
    "info": ("verify a bundle and print what it holds", measure.InfoConfig, measure.info),
    "measure": ("re-measure a bundle's test figures (accuracy, sparsity, paths, FLOPs) into its card",
                measure.Config, measure.run),
    "fit": ("fit the path scores, choose one on validation attacks, set the threshold", fit.Config, fit.run),
    "attack": ("generate reproducible adversarial sets against the decoupled model", attack.Config, attack.run),
    "evaluate": ("offline ROC evaluation of the path detector against baselines", evaluate.Config, evaluate.run),
    "adaptive": ("detector-aware attack sweep against the bundle's detector", adaptive.Config, adaptive.run),
    "explain": ("draw class path maps, class similarity, specific filters and one image's path",
                explain.Config, explain.run),
    "serve": ("run the detection service (FastAPI + uvicorn) on a bundle", serve.Config, serve.run),
}


def add_config_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One option per field of a job's Config (pathguard/jobs/config.py)."""
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = value_kind(f)
        shown = "" if f.default in (None, ()) else f" (default: {_show(f.default)})"
        common = {"dest": f.name, "default": f.default, "help": meta.get("help", "") + shown}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif isinstance(f.default, tuple):
            # argparse appends to (and so needs) a list default; config_from_args makes it a tuple again
            action = {"action": "append"} if meta.get("repeat") else {"nargs": "*" if meta.get("empty") else "+"}
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), metavar=f.name.upper(), **action,
                                **{**common, "default": list(f.default)})
        else:
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), **common)


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_from_args(config_cls, args: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathguard",
                                     description="Adversarial-image detection from calculation paths.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, config_cls, _) in COMMANDS.items():
        add_config_options(sub.add_parser(name, help=help_text, description=help_text), config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, config_cls, run = COMMANDS[args.command]
    try:
        result = run(config_from_args(config_cls, args))
    except (ArtifactError, DatasetError, FileExistsError, ValueError) as exc:
        print(f"pathguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
