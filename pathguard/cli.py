"""The `pathguard` command: one entry point for the whole pipeline.

    pathguard train     train plain + decoupled nets, write a bundle
    pathguard info      describe a bundle (verifies its manifest)
    pathguard fit       path profile + score ablation + threshold into a bundle
    pathguard attack    adversarial sets (FGSM, BIM, PGD, CW, DeepFool)
    pathguard evaluate  offline ROC against baselines (--adaptive: adaptive attack)
    pathguard explain   path interpretation figures
    pathguard serve     the HTTP service

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
    from pathguard.detector.train import TrainConfig, train

    cfg = dataclass_from_args(TrainConfig, args)
    path = train(cfg)
    print(f"bundle written to {path}")
    _print_info(path)


@command("train", "train the plain and decoupled networks and write a bundle")(_run_train)
def _configure_train(parser):
    from pathguard.detector.train import TrainConfig

    add_dataclass_options(parser, TrainConfig)


# ---------------------------------------------------------------- measure

def _run_measure(args):
    from pathguard.detector.bundle import load_bundle, update_bundle_card
    from pathguard.detector.data import load_dataset
    from pathguard.detector.train import measure_card

    bundle = load_bundle(args.bundle)
    test = load_dataset(args.dataset, "test", args.data_root)
    card = measure_card(bundle.decoupled, bundle.plain, test, None)
    update_bundle_card(bundle.path, {"test": card["test"]})
    print(json.dumps(card["test"], indent=2))


@command("measure", "re-measure a bundle's test figures (accuracy, sparsity, paths, FLOPs) into its card")(_run_measure)
def _configure_measure(parser):
    from pathguard.detector.bundle import DEFAULT_BUNDLE

    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-root", dest="data_root", default=None)


# ------------------------------------------------------------------- info

def _print_info(path) -> None:
    from pathguard.detector.bundle import load_bundle

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
    from pathguard.detector.bundle import DEFAULT_BUNDLE

    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle directory (default: the shipped one)")


# -------------------------------------------------------------------- fit

def _run_fit(args):
    from pathguard.detector.fit import FitConfig, fit_bundle

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
    from pathguard.detector.fit import FitConfig

    add_dataclass_options(parser, FitConfig, skip=("ablation_attacks",))
    parser.add_argument("--ablation-attacks", dest="ablation_attacks", nargs="+", default=["fgsm", "pgd", "cw"])


# ----------------------------------------------------------------- attack

def _run_attack(args):
    from pathguard.attacks.cli import run

    run(args)


@command("attack", "generate reproducible adversarial sets against the decoupled model")(_run_attack)
def _configure_attack(parser):
    from pathguard.attacks.cli import configure

    configure(parser)


# --------------------------------------------------------------- evaluate

def _run_evaluate(args):
    from pathguard.detector.evaluate import EvalConfig, evaluate, markdown_table

    cfg = dataclass_from_args(EvalConfig, args)
    if cfg.adaptive:
        from pathguard.detector.evaluate import adaptive_sweep, adaptive_table

        if cfg.quick:
            cfg.adaptive_n = min(cfg.adaptive_n, args.quick_n)
        print(adaptive_table(adaptive_sweep(cfg)))
        print(f"adaptive report written to {cfg.output}")
        return
    if cfg.quick:
        cfg.n = min(cfg.n, args.quick_n)
        cfg.n_supervised = min(cfg.n_supervised, args.quick_n)
    report = evaluate(cfg)
    print(markdown_table(report))
    print(f"report written to {cfg.output}")


@command("evaluate", "offline ROC evaluation of the path detector against baselines")(_run_evaluate)
def _configure_evaluate(parser):
    from pathguard.detector.evaluate import ALL_ATTACKS, EvalConfig

    add_dataclass_options(parser, EvalConfig, skip=("attacks", "supervised_attacks", "adaptive_lambdas", "adaptive_eps"))
    parser.add_argument("--adaptive-lambdas", dest="adaptive_lambdas", nargs="+", type=float,
                        default=[0.0, 1.0, 3.0, 10.0])
    parser.add_argument("--adaptive-eps", dest="adaptive_eps", nargs="+", type=float, default=[0.03, 0.1])
    parser.add_argument("--attacks", nargs="+", default=list(ALL_ATTACKS), choices=list(ALL_ATTACKS))
    parser.add_argument("--supervised-attacks", dest="supervised_attacks", nargs="+", default=["fgsm", "pgd"],
                        choices=list(ALL_ATTACKS), help="attacks the supervised detectors are trained on")
    parser.add_argument("--quick-n", type=int, default=100, help="with --quick: images per set (default 100)")


# ---------------------------------------------------------------- explain

def _run_explain(args):
    from pathguard.detector.explain import run

    run(args)


@command("explain", "draw class path maps, class similarity, specific filters and one image's path")(_run_explain)
def _configure_explain(parser):
    from pathguard.detector.explain import configure

    configure(parser)


# ------------------------------------------------------------------ serve

def _run_serve(args):
    from pathguard.service.cli import run

    return run(args)


@command("serve", "run the detection service (FastAPI + uvicorn) on a bundle")(_run_serve)
def _configure_serve(parser):
    from pathguard.service.cli import configure

    configure(parser)


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
    from pathguard.detector.artifacts import ArtifactError
    from pathguard.detector.data import DatasetError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ArtifactError, DatasetError) as exc:
        print(f"pathguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
