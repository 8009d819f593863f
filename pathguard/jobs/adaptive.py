"""`pathguard evaluate --adaptive`: the detector-aware attack sweep
(docs/evaluation.md, "Adaptive attack").

For each (eps, lambda): fooling rate, detector AUROC, and the rate of
undetected successes (fooled and scored under the stored threshold) over
all evaluation images; plus how faithful the soft surrogate is.  Then, for
each eps, the layer-mimicking variant (attacks/adaptive.py) at the largest
lambda with every ``--mimic`` weight: the attacker also pulls every block
and every gated layer's gate logits toward the clean mean of its target
class (class means from ``--n-targets`` clean training images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pathguard.attacks.adaptive import AdaptivePGD, LayerTargets, surrogate_fidelity
from pathguard.detector.artifacts import atomic_write_bytes, atomic_write_json
from pathguard.detector.bundle import load_bundle, load_detector
from pathguard.detector.measure import versions
from pathguard.detector.metrics import detection_metrics
from pathguard.detector.paths import observe

from .config import BundleOptions, as_json, check, option
from .data import data_spec, load_for, train_validation
from .evaluate import correct_sample


@dataclass
class Config(BundleOptions):
    output: str = option("reports/default", "report directory (adaptive.json, adaptive.md)")
    n: int = option(300, "evaluation images: correctly classified test images, class-stratified", minimum=1)
    lambdas: tuple = option((0.0, 1.0, 3.0, 10.0), "weights of the detector term (0 = plain PGD)", minimum=0)
    eps: tuple = option((0.03, 0.1), "L-inf budgets", minimum=0)
    steps: int = option(40, "PGD steps (step size eps / 10)", minimum=1)
    temperature: float = option(0.1, "temperature of the soft-gate surrogate", minimum=0)
    mimic: tuple = option((1.0,), "weights of the layer-mimicking term (run at the largest lambda; "
                          "empty: no layer mimicking)", minimum=0)
    n_targets: int = option(10000, "clean training images whose class means the layer mimicking aims at",
                            minimum=1)
    seed: int = option(0, "seed of the random starts")
    quick: bool = option(False, "at most 5 steps (a smoke run)")


def _setting(model, detector, evalset, clean_scores, eps: float, lam: float, steps: int, cfg: Config,
             mimic: float = 0.0, targets: LayerTargets | None = None):
    t0 = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        attack = AdaptivePGD(model, detector, eps=eps, alpha=eps / 10, steps=steps, lam=lam,
                             temperature=cfg.temperature, mimic=mimic, targets=targets)
        adv = torch.cat([attack(evalset.images[i:i + 250], evalset.labels[i:i + 250])
                         for i in range(0, len(evalset), 250)])
    adv_batch = detector.observe(model, adv)
    adv_scores = detector.score_samples(adv_batch)
    fooled = (adv_batch.predictions != evalset.labels).numpy()
    under = ~detector.flag(adv_scores)
    row = {
        "variant": "layer mimicking" if mimic > 0 else "detector-aware PGD", "mimic": mimic,
        "eps": eps, "lambda": lam, "steps": steps, "images": len(evalset),
        "fooling_rate": float(fooled.mean()),
        "undetected_success_rate": float((fooled & under).mean()),
        "flagged_among_fooled": float((~under[fooled]).mean()) if fooled.any() else None,
        "auroc": detection_metrics(clean_scores[fooled], adv_scores[fooled])["auroc"] if fooled.sum() >= 2 else None,
        "mean_l2": float((adv - evalset.images).flatten(1).norm(dim=1).mean()),
        "seconds": time.time() - t0,
    }
    return row, adv, adv_scores


def adaptive_sweep(cfg: Config) -> dict:
    check(cfg)
    started = time.time()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle)
    model = bundle.decoupled
    detector = load_detector(bundle)
    test = load_for(bundle, data_spec(bundle, cfg.dataset, cfg.data_root), "test")
    evalset = correct_sample(model, test, cfg.n, cfg.seed, "evaluation images")
    clean_scores = detector.score_samples(detector.observe(model, evalset.images))
    steps = min(cfg.steps, 5) if cfg.quick else cfg.steps
    rows = []
    fidelity = {"clean": surrogate_fidelity(detector, model, evalset.images, cfg.temperature, clean_scores)}
    for eps in cfg.eps:
        for lam in cfg.lambdas:
            row, adv, adv_scores = _setting(model, detector, evalset, clean_scores, eps, lam, steps, cfg)
            if lam == 0 and eps == max(cfg.eps):
                fidelity["adversarial (plain PGD)"] = surrogate_fidelity(
                    detector, model, adv, cfg.temperature, adv_scores)
            rows.append(row)
    if cfg.mimic:
        spec = data_spec(bundle, cfg.dataset, cfg.data_root)
        train = train_validation(bundle, spec)[0].head(cfg.n_targets)
        targets = LayerTargets.fit(observe(model, train.images, labels=train.labels, blocks=True))
        lam = max(cfg.lambdas)
        for eps in cfg.eps:
            for mimic in cfg.mimic:
                row, adv, adv_scores = _setting(model, detector, evalset, clean_scores, eps, lam, steps, cfg,
                                                mimic=mimic, targets=targets)
                rows.append(row)
            if eps == max(cfg.eps):
                fidelity["adversarial (layer mimicking)"] = surrogate_fidelity(
                    detector, model, adv, cfg.temperature, adv_scores)
    report = {
        "bundle": {"path": str(bundle.path), "digest": bundle.digest},
        "detector": {"score": detector.name, "threshold": detector.threshold_},
        "settings": rows, "surrogate_fidelity": fidelity,
        "clean_flag_rate": float(detector.flag(clean_scores).mean()),
        "config": as_json(cfg), "seed": cfg.seed, "versions": versions(), "wall_seconds": time.time() - started,
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "adaptive.json", report)
    atomic_write_bytes(out / "adaptive.md", adaptive_table(report).encode())
    return report


def adaptive_table(report: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"Adaptive PGD against score `{report['detector']['score']}` (threshold "
             f"{report['detector']['threshold']:.4g}); {report['settings'][0]['images']} images, "
             f"{report['settings'][0]['steps']} steps, step eps/10.", "",
             "| attack | eps | lambda | fooling rate | AUROC | flagged among fooled | undetected success rate "
             "| mean L2 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        variant = r.get("variant", "detector-aware PGD")
        if r.get("mimic"):
            variant += f" (mu {r['mimic']})"
        lines.append(f"| {variant} | {r['eps']} | {r['lambda']} | {f(r['fooling_rate'])} | {f(r['auroc'])} "
                     f"| {f(r['flagged_among_fooled'])} | {f(r['undetected_success_rate'])} | {f(r['mean_l2'])} |")
    lines.append("")
    for name, fid in report["surrogate_fidelity"].items():
        lines.append(f"Surrogate fidelity on {name} images ({fid['images']}): Pearson {f(fid['pearson'])}, "
                     f"Spearman {f(fid['spearman'])}.")
    lines.append(f"\nWall time: {report['wall_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict:
    report = adaptive_sweep(cfg)
    print(adaptive_table(report))
    print(f"adaptive report written to {cfg.output}")
    return report
