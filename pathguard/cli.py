"""The `pathguard` command: one entry point for the whole pipeline.

    pathguard train     train plain + decoupled nets, write a bundle
    pathguard info      describe a bundle (verifies its manifest)

Each subcommand lives in a small function that parses its own options and
calls into ``detector``, ``attacks`` or ``service``; this module is the only
place that knows all three.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help_text: str):
    def register(run: Callable):
        def wrap(configure: Callable):
            COMMANDS[name] = (help_text, configure, run)
            return configure
        return wrap
    return register


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --option per dataclass field, typed from its default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            kind = int if f.name.startswith(("limit", "threads")) else str  # None-default fields
            parser.add_argument(flag, dest=f.name, type=kind, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                                help=f"(default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# ------------------------------------------------------------------ train

def _run_train(args):
    from detector.train import TrainConfig, train

    cfg = dataclass_from_args(TrainConfig, args)
    path = train(cfg)
    print(f"bundle written to {path}")
    _print_info(path)


@command("train", "train the plain and decoupled networks and write a bundle")(_run_train)
def _configure_train(parser):
    from detector.train import TrainConfig

    add_dataclass_options(parser, TrainConfig)


# ------------------------------------------------------------------- info

def _print_info(path) -> None:
    from detector.bundle import load_bundle

    bundle = load_bundle(path)
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


def _run_info(args):
    _print_info(args.bundle)


@command("info", "verify a bundle and print what it holds")(_run_info)
def _configure_info(parser):
    from detector.bundle import DEFAULT_BUNDLE

    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle directory (default: the shipped one)")


# -------------------------------------------------------------------- fit

def _run_fit(args):
    from detector.fit import FitConfig, fit_bundle

    cfg = dataclass_from_args(FitConfig, args)
    result = fit_bundle(cfg)
    table = result["ablation"]["results"]
    print("ablation on validation attacks (AUROC):")
    for score, row in sorted(table.items(), key=lambda kv: -kv[1]["mean_auroc"]):
        per = ", ".join(f"{a}={v:.4f}" for a, v in row["auroc"].items())
        print(f"  {score:18s} mean={row['mean_auroc']:.4f}  {per}")
    print(f"chosen score: {result['score']}; threshold {result['threshold']:.6g} "
          f"(target FPR {cfg.target_fpr}) written to {cfg.bundle}")


@command("fit", "fit the path profile, choose the score on validation attacks, set the threshold")(_run_fit)
def _configure_fit(parser):
    from detector.fit import FitConfig

    add_dataclass_options(parser, FitConfig, skip=("ablation_attacks",))
    parser.add_argument("--ablation-attacks", dest="ablation_attacks", nargs="+", default=["fgsm", "pgd"])


# ----------------------------------------------------------------- attack

def _run_attack(args):
    from attacks.cli import run

    run(args)


@command("attack", "generate reproducible adversarial sets against the decoupled model")(_run_attack)
def _configure_attack(parser):
    from attacks.cli import configure

    configure(parser)


# --------------------------------------------------------------- evaluate

def _run_evaluate(args):
    from detector.evaluate import EvalConfig, evaluate, markdown_table

    cfg = dataclass_from_args(EvalConfig, args)
    if cfg.quick:
        cfg.n = min(cfg.n, args.quick_n)
        cfg.n_supervised = min(cfg.n_supervised, args.quick_n)
    report = evaluate(cfg)
    print(markdown_table(report))
    print(f"report written to {cfg.output}")


@command("evaluate", "offline ROC evaluation of the path detector against baselines")(_run_evaluate)
def _configure_evaluate(parser):
    from detector.evaluate import ALL_ATTACKS, EvalConfig

    add_dataclass_options(parser, EvalConfig, skip=("attacks", "supervised_attacks"))
    parser.add_argument("--attacks", nargs="+", default=list(ALL_ATTACKS), choices=list(ALL_ATTACKS))
    parser.add_argument("--supervised-attacks", dest="supervised_attacks", nargs="+", default=["fgsm", "pgd"],
                        choices=list(ALL_ATTACKS), help="attacks the supervised detectors are trained on")
    parser.add_argument("--quick-n", type=int, default=100, help="with --quick: images per set (default 100)")


# ------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathguard", description="Adversarial-image detection from calculation paths.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from detector.artifacts import ArtifactError
    from detector.data import DatasetError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ArtifactError, DatasetError) as exc:
        print(f"pathguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
