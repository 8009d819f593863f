"""`pathguard evaluate`: the offline ROC evaluation of design.md §3.

One run, one model, the same samples for every detector:

* evaluation images: the first N test images the decoupled model classifies
  correctly; every attack is run on them (white-box, inference mode);
* positives: successful adversarial examples; negatives: their originals;
* unsupervised detectors: the bundle's path detector (profile + stored
  threshold), max-softmax, Mahalanobis (fitted on the clean training part);
* supervised detectors: the path classifier and LID, both trained on the
  same adversarial examples of the *seen* attacks, generated on validation
  images (never on test images), and reported on seen and unseen attacks;
* Gaussian-noise copies of each original, with the L2 norm of its
  perturbation, measure how often noise alone is flagged.

Output folder: report.json (every figure, seed, versions, configuration,
sample counts, wall time), report.md, and roc_<attack>.png per attack.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_write_bytes, atomic_write_json
from .baselines import LID, Mahalanobis, max_softmax_score
from .bundle import DEFAULT_BUNDLE, load_bundle
from .data import load_dataset
from .fit import load_detector, split_of
from .metrics import detection_metrics, roc_points
from .paths import PathBatch, extract_paths
from .supervised import SupervisedPathDetector
from .train import versions

ALL_ATTACKS = ("fgsm", "bim", "pgd", "cw", "deepfool", "fgsm-low", "bim-low", "pgd-low")
QUICK_OVERRIDES = {"pgd": {"steps": 5}, "bim": {"steps": 3}, "cw": {"steps": 10}, "deepfool": {"steps": 5},
                   "pgd-low": {"steps": 5}, "bim-low": {"steps": 3}}
UNSUPERVISED = ("path", "max-softmax", "mahalanobis")
SUPERVISED = ("path-supervised", "lid")


@dataclass
class EvalConfig:
    bundle: str = str(DEFAULT_BUNDLE)
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    output: str = "reports/default"
    n: int = 2000
    attacks: tuple = ALL_ATTACKS
    supervised_attacks: tuple = ("fgsm", "pgd")
    n_supervised: int = 1000
    seed: int = 0
    quick: bool = False
    limit_train: int | None = None  # clean training images for Mahalanobis (default: all)
    progress: bool = True
    save_attacks: str | None = None  # also write each test attack set here (pathguard attack's format)
    update_card: bool = True  # copy the headline figures into the bundle's model card (served by /model)
    # --adaptive: run only the detector-aware attack sweep (attacks/adaptive.py)
    adaptive: bool = False
    adaptive_n: int = 300
    adaptive_lambdas: tuple = (0.0, 1.0, 3.0, 10.0)
    adaptive_eps: tuple = (0.03, 0.1)
    adaptive_steps: int = 40
    adaptive_temperature: float = 0.1


def noise_like(original: torch.Tensor, adversarial: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise with, per image, the L2 norm of its perturbation
    (clipped to [0, 1] afterwards, like the adversarial image)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(original.shape, generator=gen)
    target = (adversarial - original).flatten(1).norm(dim=1)
    noise = noise * (target / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
    return (original + noise).clamp(0, 1)


def _subset(batch: PathBatch, mask) -> PathBatch:
    mask = torch.as_tensor(mask)
    return PathBatch(batch.logits[mask], batch.paths[mask], batch.gate_logits[mask], batch.features[mask])


class _Timer:
    def __init__(self) -> None:
        self.sections: dict[str, float] = {}

    def section(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.time()

            def __exit__(self, *exc):
                timer.sections[name] = timer.sections.get(name, 0.0) + time.time() - self.t
        return _Ctx()


def evaluate(cfg: EvalConfig) -> dict:
    from pathguard.attacks.cli import select_correct
    from pathguard.attacks.generate import generate_attack_set

    started = time.time()
    timer = _Timer()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle)
    model = bundle.decoupled
    detector = load_detector(bundle)
    overrides = QUICK_OVERRIDES if cfg.quick else {}

    with timer.section("data and baselines fit"):
        test = load_dataset(cfg.dataset, "test", cfg.data_root)
        train, val = split_of(bundle, load_dataset(cfg.dataset, "train", cfg.data_root))
        if cfg.limit_train:
            train = train.head(cfg.limit_train)
        train_batch = extract_paths(model, train.images)
        mahalanobis = Mahalanobis().fit(train_batch.features, train.labels, bundle.arch.num_classes)
        eval_idx = select_correct(model, test.images, test.labels, cfg.n)
        evalset = test.subset(eval_idx)
        clean_batch = extract_paths(model, evalset.images)
        all_test_batch = extract_paths(model, test.images)

    clean_scores = {
        "path": detector.score_samples(clean_batch),
        "max-softmax": max_softmax_score(clean_batch.logits),
        "mahalanobis": mahalanobis.score_samples(clean_batch.features),
    }

    # Supervised detectors: trained on seen attacks of validation images.
    with timer.section("supervised training"):
        sup_idx = select_correct(model, val.images, val.labels, cfg.n_supervised)
        supset = val.subset(sup_idx)
        sup_clean, sup_adv, lid_parts = [], [], ([], [], [])
        for name in cfg.supervised_attacks:
            aset = generate_attack_set(model, supset.images, supset.labels, name, seed=cfg.seed,
                                       overrides=overrides.get(name), progress=cfg.progress)
            ok = aset.success
            sup_clean.append(supset.images[ok])
            sup_adv.append(aset.adversarial[ok])
            lid_parts[0].append(supset.images[ok])
            lid_parts[1].append(noise_like(supset.images[ok], aset.adversarial[ok], cfg.seed))
            lid_parts[2].append(aset.adversarial[ok])
        path_sup = SupervisedPathDetector(detector.profile, seed=cfg.seed).fit(
            extract_paths(model, torch.cat(sup_clean)), extract_paths(model, torch.cat(sup_adv)),
            tuple(cfg.supervised_attacks))
        lid = LID(seed=cfg.seed).fit(model, *(torch.cat(p) for p in lid_parts))

    results = {}
    curves = {}
    for name in cfg.attacks:
        with timer.section(f"attack {name}"):
            aset = generate_attack_set(model, evalset.images, evalset.labels, name, seed=cfg.seed,
                                       overrides=overrides.get(name), progress=cfg.progress)
            if cfg.save_attacks:
                from pathguard.attacks.generate import save_attack_set

                save_attack_set(aset, Path(cfg.save_attacks) / name)
        with timer.section(f"score {name}"):
            ok = aset.success.numpy()
            record = {
                "attack": {
                    "config": aset.config, "images": len(evalset), "successes": int(ok.sum()),
                    "success_rate": float(ok.mean()),
                    "mean_l2": float(aset.l2[ok].mean()) if ok.any() else None,
                    "mean_linf": float(aset.linf[ok].mean()) if ok.any() else None,
                },
                "seen_by_supervised": name in cfg.supervised_attacks,
            }
            if ok.sum() < 2:
                record["detectors"] = {}
                record["note"] = "fewer than 2 successful adversarial examples: no detection metrics"
                results[name] = record
                continue
            adv_batch = _subset(extract_paths(model, aset.adversarial), ok)
            noisy = noise_like(evalset.images[ok], aset.adversarial[ok], cfg.seed)
            noisy_batch = extract_paths(model, noisy)
            pos = {
                "path": detector.score_samples(adv_batch),
                "max-softmax": max_softmax_score(adv_batch.logits),
                "mahalanobis": mahalanobis.score_samples(adv_batch.features),
            }
            neg = {k: v[ok] for k, v in clean_scores.items()}
            neg["path-supervised"] = path_sup.score_samples(_subset(clean_batch, ok))
            pos["path-supervised"] = path_sup.score_samples(adv_batch)
            neg["lid"], pos["lid"] = lid.score_pairs(model, evalset.images[ok], aset.adversarial[ok])
            record["detectors"] = {d: detection_metrics(neg[d], pos[d]) for d in UNSUPERVISED + SUPERVISED}
            record["path_threshold"] = {
                "adversarial_flag_rate": float((pos["path"] > detector.threshold).mean()),
                "noise_flag_rate": float((detector.score_samples(noisy_batch) > detector.threshold).mean()),
                "noise_misclassified_rate": float((noisy_batch.predictions != evalset.labels[ok]).float().mean()),
            }
            curves[name] = {d: roc_points(neg[d], pos[d]) for d in UNSUPERVISED + SUPERVISED}
            results[name] = record

    report = {
        "bundle": {"path": str(bundle.path), "digest": bundle.digest},
        "detector": {"score": detector.score, "threshold": detector.threshold, "target_fpr": detector.target_fpr},
        "clean": {
            "evaluation_images": len(evalset),
            "threshold_fpr_on_evaluation_images": float((clean_scores["path"] > detector.threshold).mean()),
            "threshold_fpr_on_all_test_images": float(
                (detector.score_samples(all_test_batch) > detector.threshold).mean()),
            "all_test_images": len(test),
        },
        "attacks": results,
        "samples": {"evaluation": len(evalset), "supervised_training_validation_images": len(supset),
                    "mahalanobis_training_images": len(train)},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "seed": cfg.seed,
        "versions": versions(),
        "timing_seconds": timer.sections,
        "wall_seconds": time.time() - started,
    }
    write_report(Path(cfg.output), report, curves)
    if cfg.update_card and not cfg.quick:
        update_card_from_report(bundle.path, report)
    return report


def card_summary(report: dict) -> dict:
    """The headline figures of a report, small enough for the model card."""
    return {
        "images": report["clean"]["evaluation_images"],
        "seed": report["seed"],
        "detector_score": report["detector"]["score"],
        "threshold_fpr_on_all_test_images": report["clean"]["threshold_fpr_on_all_test_images"],
        "attacks": {
            name: {"success_rate": rec["attack"]["success_rate"],
                   "auroc": {d: m["auroc"] for d, m in rec.get("detectors", {}).items()},
                   "flag_rate_at_threshold": rec.get("path_threshold", {}).get("adversarial_flag_rate")}
            for name, rec in report["attacks"].items()
        },
        "supervised_trained_on": report["config"]["supervised_attacks"],
        "wall_seconds": report["wall_seconds"],
    }


def update_card_from_report(bundle_path: str | Path, report: dict) -> None:
    from .bundle import update_bundle_card

    update_bundle_card(bundle_path, {"evaluation": card_summary(report)})


def markdown_table(report: dict) -> str:
    lines = [
        f"Detector score `{report['detector']['score']}`, threshold {report['detector']['threshold']:.4g} "
        f"(target FPR {report['detector']['target_fpr']:.0%}); {report['clean']['evaluation_images']} evaluation "
        f"images; threshold FPR on all {report['clean']['all_test_images']} clean test images: "
        f"{report['clean']['threshold_fpr_on_all_test_images']:.3f}.",
        "",
        "AUROC (unsupervised: path, max-softmax, Mahalanobis | supervised: path-supervised, LID; "
        "* = attack seen by the supervised detectors in training)",
        "",
        "| attack | success | mean L2 | mean Linf | path | max-softmax | Mahalanobis | path-sup | LID "
        "| path TPR@5% | flagged (threshold) | noise flagged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in report["attacks"].items():
        a = rec["attack"]
        d = rec.get("detectors", {})
        if not d:
            lines.append(f"| {name} | {a['success_rate']:.3f} | - | - | - | - | - | - | - | - | - | - |")
            continue

        def au(k):
            return f"{d[k]['auroc']:.4f}"

        star = "*" if rec["seen_by_supervised"] else ""
        t = rec["path_threshold"]
        lines.append(
            f"| {name}{star} | {a['success_rate']:.3f} | {a['mean_l2']:.3f} | {a['mean_linf']:.3f} | {au('path')} "
            f"| {au('max-softmax')} | {au('mahalanobis')} | {au('path-supervised')} | {au('lid')} "
            f"| {d['path']['tpr_at_5fpr']:.3f} | {t['adversarial_flag_rate']:.3f} | {t['noise_flag_rate']:.3f} |")
    lines += ["", f"Wall time: {report['wall_seconds']:.0f} s ({report['versions']['threads']} threads, "
                  f"{report['versions']['machine']})."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for name, per_detector in curves.items():
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for det, (fpr, tpr) in per_detector.items():
            auroc = report["attacks"][name]["detectors"][det]["auroc"]
            ax.plot(fpr, tpr, label=f"{det} (AUROC {auroc:.3f})", linestyle="--" if det in SUPERVISED else "-")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set_xlabel("false positive rate (clean flagged)")
        ax.set_ylabel("true positive rate (adversarial flagged)")
        ax.set_title(f"ROC: {name}, {report['attacks'][name]['attack']['successes']} successful examples")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        png = out / f"roc_{name}.png"
        tmp = out / f".roc_{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(png)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", markdown_table(report).encode())


def adaptive_sweep(cfg: EvalConfig) -> dict:
    """For each (eps, lambda): fooling rate, detector AUROC, and the rate of
    undetected successes (fooled and scored under the stored threshold) over
    all evaluation images; plus how faithful the soft surrogate is."""
    from pathguard.attacks.adaptive import AdaptivePGD, surrogate_fidelity
    from pathguard.attacks.cli import select_correct

    started = time.time()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle)
    model = bundle.decoupled
    detector = load_detector(bundle)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    evalset = test.subset(select_correct(model, test.images, test.labels, cfg.adaptive_n))
    clean_batch = extract_paths(model, evalset.images)
    clean_scores = detector.score_samples(clean_batch)
    steps = min(cfg.adaptive_steps, 5) if cfg.quick else cfg.adaptive_steps
    rows = []
    fidelity = {"clean": surrogate_fidelity(detector, model, evalset.images, cfg.adaptive_temperature, clean_scores)}
    for eps in cfg.adaptive_eps:
        for lam in cfg.adaptive_lambdas:
            t0 = time.time()
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                attack = AdaptivePGD(model, detector, eps=eps, alpha=eps / 10, steps=steps, lam=lam,
                                     temperature=cfg.adaptive_temperature)
                adv = torch.cat([attack(evalset.images[i:i + 250], evalset.labels[i:i + 250])
                                 for i in range(0, len(evalset), 250)])
            adv_batch = extract_paths(model, adv)
            adv_scores = detector.score_samples(adv_batch)
            fooled = (adv_batch.predictions != evalset.labels).numpy()
            under = adv_scores <= detector.threshold
            row = {
                "eps": eps, "lambda": lam, "steps": steps, "images": len(evalset),
                "fooling_rate": float(fooled.mean()),
                "undetected_success_rate": float((fooled & under).mean()),
                "flagged_among_fooled": float((~under[fooled]).mean()) if fooled.any() else None,
                "auroc": detection_metrics(clean_scores[fooled], adv_scores[fooled])["auroc"] if fooled.sum() >= 2 else None,
                "mean_l2": float((adv - evalset.images).flatten(1).norm(dim=1).mean()),
                "seconds": time.time() - t0,
            }
            if lam == 0 and eps == max(cfg.adaptive_eps):
                fidelity["adversarial (plain PGD)"] = surrogate_fidelity(
                    detector, model, adv, cfg.adaptive_temperature, adv_scores)
            rows.append(row)
    report = {
        "bundle": {"path": str(bundle.path), "digest": bundle.digest},
        "detector": {"score": detector.score, "threshold": detector.threshold},
        "settings": rows, "surrogate_fidelity": fidelity,
        "clean_flag_rate": float((clean_scores > detector.threshold).mean()),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "seed": cfg.seed, "versions": versions(), "wall_seconds": time.time() - started,
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
             "| eps | lambda | fooling rate | AUROC | flagged among fooled | undetected success rate | mean L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        lines.append(f"| {r['eps']} | {r['lambda']} | {f(r['fooling_rate'])} | {f(r['auroc'])} "
                     f"| {f(r['flagged_among_fooled'])} | {f(r['undetected_success_rate'])} | {f(r['mean_l2'])} |")
    lines.append("")
    for name, fid in report["surrogate_fidelity"].items():
        lines.append(f"Surrogate fidelity on {name} images ({fid['images']}): Pearson {f(fid['pearson'])}, "
                     f"Spearman {f(fid['spearman'])}.")
    lines.append(f"\nWall time: {report['wall_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"
