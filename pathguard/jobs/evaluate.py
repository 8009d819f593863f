"""`pathguard evaluate`: the offline ROC evaluation (docs/evaluation.md).

One run, one model, the same samples for every detector:

* data: the bundle's own (jobs/data.py) unless --dataset/--data-root say
  otherwise;
* evaluation images: N test images the decoupled model classifies
  correctly, drawn class-stratified and seeded; every attack is run on
  them (white-box, inference mode);
* positives: successful adversarial examples; negatives: their originals;
* unsupervised detectors (``Config.unsupervised``): the bundle's own path
  detector (``path``: its stored profile and threshold), and registered
  baselines fitted on the clean training part;
* supervised detectors (``Config.supervised``): trained on adversarial
  examples of the *seen* attacks, generated on correctly classified
  validation images (drawn like the evaluation images; never test images),
  and reported on seen and unseen attacks;
* Gaussian-noise copies of each original, with the L2 norm of its
  perturbation, measure how often noise alone is flagged.

Every detector comes from the registry (detector.detectors) and is used
through the one interface: fit, score_samples, predict.
Output folder: report.json, report.md and roc_<attack>.png per attack
(jobs/report.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pathguard.attacks.generate import save_attack_set
from pathguard.attacks.presets import ALL_PRESETS, PRESETS
from pathguard.detector.bundle import load_bundle, load_detector, update_bundle_card
from pathguard.detector.data import ImageSet
from pathguard.detector.channel_supervised import wide_channels
from pathguard.detector.detectors import (
    DETECTORS,
    ChannelScore,
    ChannelSupervisedDetector,
    Detector,
    PathScore,
    SupervisedPathDetector,
    make_detector,
)
from pathguard.detector.devices import resolve_device
from pathguard.detector.measure import versions
from pathguard.detector.metrics import detection_metrics, roc_points
from pathguard.detector.natural import natural_ood
from pathguard.detector.paths import PathBatch, correct_mask, device_of, observe
from pathguard.detector.splits import class_counts

from .attack_pool import AttackPool, default_workers
from .attack_reuse import reusable_sets, set_folder
from .config import BundleOptions, as_json, check, device_option, option
from .data import data_spec, load_for, train_validation
from .report import card_summary, markdown_table, write_report

ALL_ATTACKS = tuple(PRESETS)  # the protocol's attacks, the default
# also selectable: the extra presets (e.g. the -bpda ones through the soft-gate surrogate)
SELECTABLE_ATTACKS = tuple(ALL_PRESETS)
QUICK_OVERRIDES = {"pgd": {"steps": 5}, "bim": {"steps": 3}, "cw": {"steps": 10}, "deepfool": {"steps": 5},
                   "pgd-low": {"steps": 5}, "bim-low": {"steps": 3}}
BUNDLE_DETECTOR = "path"  # the bundle's own, already fitted and calibrated


@dataclass
class Config(BundleOptions):
    device: str = device_option()
    output: str = option("reports/default", "report directory")
    n: int = option(2000, "evaluation images: correctly classified test images, class-stratified", minimum=1)
    attacks: tuple = option(ALL_ATTACKS, "attacks to evaluate", choices=SELECTABLE_ATTACKS)
    unsupervised: tuple = option((BUNDLE_DETECTOR, "max-softmax", "energy", "mahalanobis", "mahalanobis-multi",
                                  "knn"),
                                 "unsupervised detectors ('path' = the bundle's)",
                                 choices=(BUNDLE_DETECTOR, *DETECTORS))
    supervised: tuple = option(("path-supervised", "channels-supervised", "lid"),
                               "supervised detectors (the flag alone: none, and no supervised attack sets)",
                               choices=tuple(DETECTORS), empty=True)
    supervised_attacks: tuple = option(("fgsm", "pgd"), "attacks the supervised detectors are trained on",
                                       choices=SELECTABLE_ATTACKS)
    n_supervised: int = option(1000, "validation images attacked to train the supervised detectors", minimum=1)
    seed: int = option(0, "seed of the attacks and the noise copies")
    quick: bool = option(False, "few attack steps and at most --quick-n images (a smoke run)")
    quick_n: int = option(100, "with --quick: images per set", minimum=1)
    limit_train: int | None = option(None, "clean training images the baselines are fitted on (default: all)",
                                     kind=int, minimum=1)
    progress: bool = option(True, "progress bars")
    attack_workers: int | None = option(None, "processes generating the attack sets side by side (default: one "
                                        "per usable CPU core, at most 4; 1 on a GPU; 1 = in this process)",
                                        kind=int, minimum=1)
    save_attacks: str | None = option(None, "also write each attack set here (pathguard attack's format; "
                                      "the supervised detectors' under supervised/)", kind=str)
    # Only the sets provably identical to what this run would make are reused
    # (same model, images, settings, seed: jobs/attack_reuse.py).
    attacks_from: str | None = option(None, "reuse the attack sets an earlier --save-attacks wrote here when "
                                      "they are this run's (same model, images, settings, seed); others are "
                                      "generated", kind=str)
    update_card: bool = option(True, "copy the headline figures into the bundle's model card (served by /model)")
    natural: bool = option(True, "also score the natural out-of-distribution set (blank, inverted, white "
                           "background, noise, rotated images; detector/natural.py)")


def noise_like(original: torch.Tensor, adversarial: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise with, per image, the L2 norm of its perturbation
    (clipped to [0, 1] afterwards, like the adversarial image)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(original.shape, generator=gen)
    target = (adversarial - original).flatten(1).norm(dim=1)
    noise = noise * (target / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
    return (original + noise).clamp(0, 1)


def correct_sample(model, data: ImageSet, n: int, seed: int, what: str) -> ImageSet:
    """``n`` images of ``data`` that the model classifies correctly, drawn
    class-stratified and seeded; fewer (with a note) when there are fewer."""
    picked = data.sample(n, seed, mask=correct_mask(model, data.images, data.labels), shrink=True)
    for note in picked.notes[len(data.notes):]:
        print(f"note: {what}: {note}")
    return picked


class _Timer:
    def __init__(self) -> None:
        self.sections: dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        """A time measured elsewhere (an attack set's, in the process that made it)."""
        self.sections[name] = self.sections.get(name, 0.0) + seconds

    def section(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.time()

            def __exit__(self, *exc):
                timer.record(name, time.time() - self.t)
        return _Ctx()


def _needs(names, what: str, bundle_detector: Detector | None = None) -> bool:
    """Whether any of the named detectors, or the bundle's own detector,
    reads ``what`` ("blocks" or "activations") of a batch."""
    needs = [DETECTORS[n].requires for n in names if n != BUNDLE_DETECTOR]
    if bundle_detector is not None:
        needs.append(bundle_detector.requires)
    return any(what in r for r in needs)


@dataclass
class _Run:
    """What every step of one evaluation shares."""

    cfg: Config
    model: torch.nn.Module
    detectors: dict[str, Detector]
    evalset: ImageSet
    needs_activations: bool
    timer: _Timer
    attacks: AttackPool
    needs_blocks: bool = False
    source: dict = field(default_factory=dict)  # recorded in the attack sets --save-attacks writes
    reused: dict = field(default_factory=dict)  # --attacks-from: {task key: saved AttackSet}

    def observe(self, images: torch.Tensor) -> PathBatch:
        return observe(self.model, images, activations=self.needs_activations, blocks=self.needs_blocks)

    def attack(self, key: str):
        """The attack set ``key`` ("test:<attack>" or "supervised:<attack>"),
        submitted to the pool at the start of the run."""
        if key in self.reused:  # generated by an earlier run: no generation time here
            return self.reused[key]
        aset = self.attacks.result(key)
        self.timer.record(f"attack {key.removeprefix('test:')}", aset.wall_time)
        if self.cfg.save_attacks:
            split, selection = (("test", "the evaluation images") if key.startswith("test:") else
                                ("validation", "the supervised detectors' training images"))
            aset.source = {**self.source, "split": split, "selection": selection}
            save_attack_set(aset, set_folder(self.cfg.save_attacks, key))
        return aset


def attack_source(bundle, spec) -> dict:
    """Where a run's attack sets come from: the bundle, and the digest of
    the model they were made against (Bundle.model_digest)."""
    return {"bundle": str(bundle.path), "bundle_digest": bundle.digest, "model_digest": bundle.model_digest,
            "dataset": spec.dataset}


def attack_tasks(cfg: Config, evalset: ImageSet, supset: ImageSet | None) -> dict:
    """Every attack set a run needs, for ``AttackPool.submit_all``: each test
    attack on the evaluation images, each seen attack on the supervised
    training images."""
    def task(images: ImageSet, name: str) -> tuple:
        overrides = QUICK_OVERRIDES.get(name) if cfg.quick else None
        return images.images, images.labels, name, cfg.seed, overrides
    tasks = {f"test:{name}": task(evalset, name) for name in cfg.attacks}
    if supset is not None:
        tasks.update({f"supervised:{name}": task(supset, name) for name in cfg.supervised_attacks})
    return tasks


def _fit_unsupervised(cfg: Config, bundle_detector: PathScore, train: ImageSet, model) -> dict[str, Detector]:
    """The unsupervised baselines, fitted on the clean training part.  A
    detector that reads every layer's activations (NIC) is fitted on its
    own seeded draw of at most its ``max_fit`` images: activations of the
    whole training part would not fit in memory."""
    detectors = {}
    train_batch = None
    for name in cfg.unsupervised:
        if name == BUNDLE_DETECTOR:
            detectors[name] = bundle_detector
            continue
        detector = make_detector(name)
        if hasattr(detector, "seed"):  # NIC's draw of fit rows follows the run's seed
            detector.seed = cfg.seed
        if detector.supervised:
            raise ValueError(f"{name} is supervised: list it under --supervised")
        if "activations" in detector.requires:
            part = train.sample(min(getattr(detector, "max_fit", len(train)), len(train)), cfg.seed, shrink=True)
            detectors[name] = detector.fit(observe(model, part.images, labels=part.labels, activations=True))
            continue
        if train_batch is None:
            train_batch = observe(model, train.images, labels=train.labels, blocks=_needs(cfg.unsupervised, "blocks"))
        detectors[name] = detector.fit(train_batch)
    return detectors


def _channel_models(run: _Run, train: ImageSet) -> ChannelScore:
    """Detector v2's channels (every block's value check, every gated layer's
    class evidence, confidence, path), fitted on a seeded draw of clean
    training images: the features of ``channels-supervised``."""
    part = train.sample(min(ChannelScore().max_fit, len(train)), run.cfg.seed, shrink=True)
    batch = observe(run.model, part.images, labels=part.labels, blocks=True)
    return make_detector("channels", channels=wide_channels(batch), seed=run.cfg.seed).fit(batch)


def _fit_supervised(run: _Run, supset: ImageSet, bundle_detector: PathScore, train: ImageSet) -> None:
    """Train the supervised detectors on seen attacks of validation images
    (``supset``)."""
    clean, adversarial, noisy = [], [], []
    for name in run.cfg.supervised_attacks:
        aset = run.attack(f"supervised:{name}")
        ok = aset.success
        clean.append(supset.images[ok])
        adversarial.append(aset.adversarial[ok])
        noisy.append(noise_like(supset.images[ok], aset.adversarial[ok], run.cfg.seed))
    clean_b, adv_b = run.observe(torch.cat(clean)), run.observe(torch.cat(adversarial))
    for name in run.cfg.supervised:
        detector = make_detector(name, seed=run.cfg.seed)
        if not detector.supervised:
            raise ValueError(f"{name} is not supervised: list it under --unsupervised")
        if isinstance(detector, SupervisedPathDetector):
            # its profile: the bundle's, fitted on all clean training images
            detector = SupervisedPathDetector(seed=run.cfg.seed, profile_from=bundle_detector)
        elif isinstance(detector, ChannelSupervisedDetector):
            # its channel models: fitted on clean training images, like the unsupervised baselines;
            # its guard: the bundle's own detector
            detector = ChannelSupervisedDetector(seed=run.cfg.seed, channels_from=_channel_models(run, train),
                                                 guard_from=bundle_detector)
        if name == "lid":  # the paper's negatives: clean and noisy copies
            # small (--quick) runs: a reference minibatch of at most half the clean examples,
            # and fewer neighbours than references
            detector.n_reference = min(detector.n_reference, len(clean_b) // 2)
            detector.k = max(1, min(detector.k, detector.n_reference - 1))
            detector.fit(clean_b, adv_b, noisy=run.observe(torch.cat(noisy)))
        else:
            detector.fit(clean_b, adv_b)
        run.detectors[name] = detector


def _score_attack(run: _Run, name: str, clean_batch: PathBatch, clean_scores: dict) -> tuple[dict, dict]:
    """One attack's record and ROC curves."""
    cfg, path = run.cfg, run.detectors[BUNDLE_DETECTOR]
    aset = run.attack(f"test:{name}")
    ok = aset.success
    record = {
        "attack": {
            "config": aset.config, "images": len(run.evalset), "successes": int(ok.sum()),
            "success_rate": float(ok.float().mean()),
            "mean_l2": float(aset.l2[ok].mean()) if ok.any() else None,
            "mean_linf": float(aset.linf[ok].mean()) if ok.any() else None,
        },
        "seen_by_supervised": bool(cfg.supervised) and name in cfg.supervised_attacks,
    }
    if ok.sum() < 2:
        record["detectors"] = {}
        record["note"] = "fewer than 2 successful adversarial examples: no detection metrics"
        return record, {}
    with run.timer.section(f"score {name}"):
        adv_batch = run.observe(aset.adversarial[ok])
        noisy_batch = observe(run.model, noise_like(run.evalset.images[ok], aset.adversarial[ok], cfg.seed),
                              blocks=run.needs_blocks)
        neg = {d: scores[ok.numpy()] for d, scores in clean_scores.items()}
        pos = {d: det.score_samples(adv_batch) for d, det in run.detectors.items()}
        record["detectors"] = {d: detection_metrics(neg[d], pos[d]) for d in run.detectors}
        record["path_threshold"] = {
            "adversarial_flag_rate": float(path.flag(pos[BUNDLE_DETECTOR]).mean()),
            "noise_flag_rate": float(path.predict(noisy_batch).mean()),
            "noise_misclassified_rate": float((noisy_batch.predictions != run.evalset.labels[ok]).float().mean()),
        }
        curves = {d: roc_points(neg[d], pos[d]) for d in run.detectors}
    return record, curves


def _score_natural(run: _Run, clean_batch: PathBatch, clean_scores: dict) -> dict:
    """Each natural out-of-distribution group, built from the evaluation
    images: the share the stored threshold flags, the share classified as
    the source image's class (for groups made from test images), and every
    detector's AUROC of the group against the clean evaluation images."""
    natural = natural_ood(run.evalset.images, seed=run.cfg.seed)
    path = run.detectors[BUNDLE_DETECTOR]
    out, answers = {}, []
    for name, images in natural.groups.items():
        batch = run.observe(images)
        scores = {d: det.score_samples(batch) for d, det in run.detectors.items()}
        flagged = np.asarray(path.flag(scores[BUNDLE_DETECTOR]), dtype=bool)
        record = {"images": len(images), "provenance": natural.provenance[name], "flag_rate": float(flagged.mean()),
                  "auroc": {d: detection_metrics(clean_scores[d], scores[d])["auroc"] for d in run.detectors}}
        # An image made from a test image has a right answer (its source's class); the others have none.
        same = np.zeros(len(images), dtype=bool)
        if natural.provenance[name]["from_test_images"]:
            same = (batch.predictions == run.evalset.labels).numpy()
            record.update(flag_split(flagged, same))
        answers.append((flagged, same))
        out[name] = record
    flagged_all, same_all = (np.concatenate(parts) for parts in zip(*answers))
    return {"groups": out, "flag_rate_all": float(flagged_all.mean()), "seed": run.cfg.seed,
            "flag_rate_wrong_answer": float(flagged_all[~same_all].mean()) if (~same_all).any() else None,
            "clean_flag_rate": float(path.flag(clean_scores[BUNDLE_DETECTOR]).mean())}


def flag_split(flagged: np.ndarray, same: np.ndarray) -> dict:
    """The share classified as the source image's class, and the share
    flagged among the images whose answer changed (wrong: the answer a
    flag should stop) and among those whose answer stayed right (None
    where there are none)."""
    return {"same_class_rate": float(same.mean()),
            "flag_rate_class_changed": float(flagged[~same].mean()) if (~same).any() else None,
            "flag_rate_same_class": float(flagged[same].mean()) if same.any() else None}


def evaluate(cfg: Config) -> dict:
    check(cfg)
    if cfg.quick:
        cfg = replace(cfg, n=min(cfg.n, cfg.quick_n), n_supervised=min(cfg.n_supervised, cfg.quick_n))
    if BUNDLE_DETECTOR not in cfg.unsupervised:
        raise ValueError(f"--unsupervised must include {BUNDLE_DETECTOR!r}, the bundle's detector")
    started, timer = time.time(), _Timer()
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.bundle).to(resolve_device(cfg.device))
    model = bundle.decoupled
    path = load_detector(bundle)
    with timer.section("data and baselines fit"):
        spec = data_spec(bundle, cfg.dataset, cfg.data_root)
        test = load_for(bundle, spec, "test")
        train, val = train_validation(bundle, spec)
        if cfg.limit_train:
            train = train.head(cfg.limit_train)
        evalset = correct_sample(model, test, cfg.n, cfg.seed, "evaluation images")
        supset = (correct_sample(model, val, cfg.n_supervised, cfg.seed, "supervised training images")
                  if cfg.supervised else None)
    tasks = attack_tasks(cfg, evalset, supset)
    reused = reusable_sets(cfg.attacks_from, tasks, bundle.model_digest) if cfg.attacks_from else {}
    tasks = {key: task for key, task in tasks.items() if key not in reused}
    workers = cfg.attack_workers or default_workers(device_of(model), len(tasks))
    # an error or Ctrl-C anywhere below stops the workers at once (AttackPool.__exit__)
    with AttackPool(model, bundle.path, bundle.digest, workers, progress=cfg.progress) as pool:
        # Every attack set starts now, costliest first, while the baselines are fitted here.
        # (Tried: the supervised training sets first, so that the supervised training and the
        # natural set overlap the workers too: 687 s instead of 587 s, as this process's threads
        # then compete with the workers' for the two cores.)
        pool.submit_all(tasks)
        with timer.section("data and baselines fit"):
            detectors = _fit_unsupervised(cfg, path, train, model)
        names = cfg.supervised + cfg.unsupervised
        run = _Run(cfg, model, detectors, evalset, _needs(names, "activations"), timer, pool,
                   _needs(names, "blocks", path), attack_source(bundle, spec), reused)
        return _evaluate(run, bundle, spec, path, test, train, supset, started)


def _evaluate(run: _Run, bundle, spec, path: PathScore, test: ImageSet, train: ImageSet,
              supset: ImageSet | None, started: float) -> dict:
    """The rest of ``evaluate`` once the attacks are under way."""
    cfg, model, timer = run.cfg, run.model, run.timer
    if supset is not None:
        with timer.section("supervised training"):
            _fit_supervised(run, supset, path, train)
    clean_batch = run.observe(run.evalset.images)
    clean_scores = {d: det.score_samples(clean_batch) for d, det in run.detectors.items()}
    results, curves = {}, {}
    for name in cfg.attacks:
        results[name], attack_curves = _score_attack(run, name, clean_batch, clean_scores)
        if attack_curves:
            curves[name] = attack_curves
    if cfg.natural:
        with timer.section("natural"):
            natural = _score_natural(run, clean_batch, clean_scores)
    report = {
        "bundle": {"path": str(bundle.path), "digest": bundle.digest},
        "detector": {"score": path.name, "threshold": path.threshold_, "target_fpr": path.target_fpr},
        "detectors": {"unsupervised": list(cfg.unsupervised), "supervised": list(cfg.supervised),
                      "params": {d: det.config()["params"] for d, det in run.detectors.items()}},
        "clean": {
            "evaluation_images": len(run.evalset),
            "threshold_fpr_on_evaluation_images": float(path.flag(clean_scores[BUNDLE_DETECTOR]).mean()),
            "threshold_fpr_on_all_test_images": float(
                path.predict(observe(model, test.images, blocks=run.needs_blocks)).mean()),
            "all_test_images": len(test),
        },
        "attacks": results,
        **({"natural": natural} if cfg.natural else {}),
        "samples": {"evaluation": len(run.evalset),
                    "supervised_training_validation_images": len(supset) if supset is not None else 0,
                    "baseline_training_images": len(train), "selection": "class-stratified, seeded, among the "
                    "correctly classified images", "evaluation_per_class": class_counts(run.evalset.labels)},
        "data": spec.to_json(),
        "config": as_json(cfg), "seed": cfg.seed, "versions": versions(),
        "timing_seconds": timer.sections, "wall_seconds": time.time() - started,
        "attack_workers": run.attacks.workers,
        "attack_sets_reused": {key: str(set_folder(cfg.attacks_from, key)) for key in run.reused},
    }
    write_report(Path(cfg.output), report, curves)
    if cfg.update_card and not cfg.quick:
        update_bundle_card(bundle.path, {"evaluation": card_summary(report)})
    return report


def run(cfg: Config) -> dict:
    report = evaluate(cfg)
    print(markdown_table(report))
    print(f"report written to {cfg.output}")
    return report
