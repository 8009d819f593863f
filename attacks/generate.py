"""Generate, save and load attack sets: adversarial images plus everything
needed to evaluate a detector on them (docs/evaluation.md, "Positives and
negatives"; the files: docs/contracts.md, "Attack sets").

Success
    ``success[i]`` is True when the model classifies original ``i``
    correctly *and* classifies the stored adversarial image ``i`` as
    something other than the true label.  Both predictions are recomputed
    here, in inference mode, on exactly the tensors that are stored (after
    clamping to [0, 1]), not taken from the attack's internal bookkeeping:
    the positives of the evaluation are then provably misclassified by the
    model the detector watches.

Path convention
    An attack set lives in a directory ``path`` holding two files:

        path/attack.safetensors   tensors (see TENSOR_KEYS)
        path/attack.json          metadata: attack, config, seed, counts,
                                  success rate, mean norms, versions, and the
                                  SHA-256 of attack.safetensors

    Both are written atomically, tensors first and JSON last, so a present
    JSON means a complete tensor file; the recorded digest makes ``load``
    refuse a truncated, altered or mismatched tensor file.  The CLI writes
    one such directory per attack, ``<output>/<attack name>/``.

Reproducibility
    The global torch RNG (which torchattacks' random starts draw from) is
    seeded with ``seed`` once before the first batch, inside
    ``torch.random.fork_rng`` so the caller's RNG state is left untouched.
    A set is reproducible for a given seed *and* batch size; both are stored.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torchattacks
from torch import nn
from tqdm import tqdm

from pathguard.detector.artifacts import (
    ArtifactError, atomic_save_tensors, atomic_write_json, load_tensors, read_json, sha256_file,
)
from pathguard.detector.measure import versions as library_versions
from pathguard.detector.paths import device_of

from .presets import attack_config, get_preset, make_attack, run_attack

TENSORS_FILE = "attack.safetensors"
METADATA_FILE = "attack.json"
FORMAT = 1
KIND = "pathguard-attack-set"

TENSOR_KEYS = {
    "adversarial": torch.float32,
    "original": torch.float32,
    "labels": torch.int64,
    "pred_original": torch.int64,
    "pred_adversarial": torch.int64,
    "success": torch.bool,
    "l2": torch.float32,
    "linf": torch.float32,
}
OPTIONAL_TENSOR_KEYS = {"indices": torch.int64}
DEFAULT_BATCH_SIZE = 128


@dataclass
class AttackSet:
    """One attack run over N images.

    ``indices`` (optional) locates each sample in its source split, and
    ``source`` (optional) says where the model and images came from (bundle
    digest, dataset, split); the CLI fills both.
    """

    attack: str
    config: dict[str, Any]
    seed: int
    batch_size: int
    adversarial: torch.Tensor      # float32 (N, C, H, W) in [0, 1]
    original: torch.Tensor         # float32 (N, C, H, W) in [0, 1]
    labels: torch.Tensor           # int64 (N,) true labels
    pred_original: torch.Tensor    # int64 (N,)
    pred_adversarial: torch.Tensor  # int64 (N,)
    success: torch.Tensor          # bool (N,), see the module docstring
    l2: torch.Tensor               # float32 (N,) ||adv - orig||_2 per sample
    linf: torch.Tensor             # float32 (N,) ||adv - orig||_inf per sample
    wall_time: float               # seconds spent attacking and predicting
    indices: torch.Tensor | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def norm(self) -> str:
        return get_preset(self.attack).norm

    @property
    def n_correct(self) -> int:
        """Originals the model classifies correctly: the attackable ones."""
        return int((self.pred_original == self.labels).sum())

    @property
    def n_success(self) -> int:
        return int(self.success.sum())

    @property
    def success_rate(self) -> float | None:
        """Successes over correctly classified originals; None if there are none."""
        return self.n_success / self.n_correct if self.n_correct else None

    def mean_norms(self, successful_only: bool = True) -> dict[str, float | None]:
        """Mean L2 and L-inf perturbation, over successes by default (the
        positives of the evaluation); None when the selection is empty."""
        mask = self.success if successful_only else torch.ones_like(self.success)
        if not bool(mask.any()):
            return {"l2": None, "linf": None}
        return {"l2": float(self.l2[mask].mean()), "linf": float(self.linf[mask].mean())}

    def summary(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "n": len(self),
            "n_correct": self.n_correct,
            "n_success": self.n_success,
            "success_rate": self.success_rate,
            "mean_norms_success": self.mean_norms(True),
            "mean_norms_all": self.mean_norms(False),
            "wall_time_s": self.wall_time,
        }


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (binary gates) and frozen weights for the duration.

    Freezing matters: torchattacks' CW and DeepFool call ``backward()``,
    which would otherwise fill (and accumulate into) the weights' ``.grad``.
    The model's previous mode and ``requires_grad`` flags are restored.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def generate_attack_set(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack_name: str,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> AttackSet:
    """Attack ``images`` (float in [0, 1], (N, C, H, W)) with a named preset.

    Every image is attacked, correctly classified or not; ``success`` marks
    the usable ones.  Raises ValueError for an unknown attack or override.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = images.detach().to(torch.float32).cpu()
    labels = labels.detach().to(torch.int64).cpu()
    if len(images) and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must be pixels in [0, 1]")
    config = attack_config(attack_name, overrides)
    device = device_of(model)

    adversarial, pred_orig, pred_adv = [], [], []
    start = time.perf_counter()
    with attack_mode(model), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        attack = make_attack(model, attack_name, **config)
        bar = tqdm(total=len(images), desc=attack_name, unit="img", disable=not progress, leave=False)
        try:
            for i in range(0, len(images), batch_size):
                x = images[i:i + batch_size].to(device)
                y = labels[i:i + batch_size].to(device)
                adv = run_attack(attack, x, y).detach().clamp(0.0, 1.0)
                with torch.no_grad():
                    pred_orig.append(model(x).argmax(dim=1).cpu())
                    pred_adv.append(model(adv).argmax(dim=1).cpu())
                adversarial.append(adv.to(torch.float32).cpu())
                bar.update(len(x))
        finally:
            bar.close()
    wall_time = time.perf_counter() - start

    empty = torch.empty(0, dtype=torch.int64)
    adversarial_t = torch.cat(adversarial) if adversarial else images.clone()
    pred_orig_t = torch.cat(pred_orig) if pred_orig else empty
    pred_adv_t = torch.cat(pred_adv) if pred_adv else empty.clone()
    delta = (adversarial_t - images).flatten(1)
    return AttackSet(
        attack=attack_name,
        config=config,
        seed=int(seed),
        batch_size=int(batch_size),
        adversarial=adversarial_t,
        original=images.clone(),
        labels=labels.clone(),
        pred_original=pred_orig_t,
        pred_adversarial=pred_adv_t,
        success=(pred_orig_t == labels) & (pred_adv_t != labels),
        l2=delta.norm(p=2, dim=1),
        linf=delta.abs().amax(dim=1) if delta.shape[1] else torch.zeros(len(delta)),
        wall_time=wall_time,
    )


def versions() -> dict[str, str]:
    return {**library_versions(), "torchattacks": torchattacks.__version__}


def save_attack_set(attack_set: AttackSet, path: str | os.PathLike) -> Path:
    """Write ``attack_set`` to directory ``path`` (created if needed)."""
    path = Path(path)
    tensors = {key: getattr(attack_set, key) for key in TENSOR_KEYS}
    if attack_set.indices is not None:
        tensors["indices"] = attack_set.indices
    for key, dtype in {**TENSOR_KEYS, **OPTIONAL_TENSOR_KEYS}.items():
        if key in tensors and tensors[key].dtype != dtype:
            raise ValueError(f"AttackSet.{key} must be {dtype}, is {tensors[key].dtype}")
    atomic_save_tensors(path / TENSORS_FILE, tensors, metadata={"kind": KIND, "format": str(FORMAT)})
    summary = attack_set.summary()
    metadata = {
        "kind": KIND,
        "format": FORMAT,
        "attack": attack_set.attack,
        "norm": attack_set.norm,
        "config": attack_set.config,
        "seed": attack_set.seed,
        "batch_size": attack_set.batch_size,
        "counts": {"n": summary["n"], "n_correct": summary["n_correct"], "n_success": summary["n_success"]},
        "success_rate": summary["success_rate"],
        "success_definition": "original classified correctly and adversarial classified != true label",
        "mean_norms_success": summary["mean_norms_success"],
        "mean_norms_all": summary["mean_norms_all"],
        "wall_time_s": attack_set.wall_time,
        "image_shape": list(attack_set.original.shape[1:]),
        "source": attack_set.source,
        "versions": versions(),
        "tensors_file": TENSORS_FILE,
        "tensors_sha256": sha256_file(path / TENSORS_FILE),
    }
    atomic_write_json(path / METADATA_FILE, metadata)
    return path


def load_attack_set(path: str | os.PathLike) -> AttackSet:
    """Read a set written by ``save_attack_set``; ArtifactError if it is
    missing, truncated, altered or inconsistent."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: attack-set directory not found")
    meta = read_json(path / METADATA_FILE)
    if meta.get("kind") != KIND or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path / METADATA_FILE}: not an attack set of format {FORMAT}")
    tensors_path = path / TENSORS_FILE
    if not tensors_path.is_file():
        raise ArtifactError(f"{tensors_path}: file not found")
    digest = sha256_file(tensors_path)
    if digest != meta.get("tensors_sha256"):
        raise ArtifactError(
            f"{tensors_path}: SHA-256 does not match {METADATA_FILE} "
            f"({digest[:12]}... vs {str(meta.get('tensors_sha256'))[:12]}...): truncated, altered or from another set"
        )
    tensors = load_tensors(tensors_path)
    _check_tensors(tensors_path, tensors, meta)
    try:
        return AttackSet(
            attack=meta["attack"],
            config=dict(meta["config"]),
            seed=int(meta["seed"]),
            batch_size=int(meta["batch_size"]),
            wall_time=float(meta["wall_time_s"]),
            source=dict(meta.get("source") or {}),
            indices=tensors.get("indices"),
            **{key: tensors[key] for key in TENSOR_KEYS},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path / METADATA_FILE}: malformed ({exc!r})") from exc


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    expected = {**TENSOR_KEYS, **OPTIONAL_TENSOR_KEYS}
    missing = sorted(set(TENSOR_KEYS) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
    n = meta.get("counts", {}).get("n")
    for key, tensor in tensors.items():
        if tensor.dtype != expected[key]:
            raise ArtifactError(f"{path}: tensor {key!r} is {tensor.dtype}, expected {expected[key]}")
        if len(tensor) != n:
            raise ArtifactError(f"{path}: tensor {key!r} has {len(tensor)} rows, metadata says {n}")
    if tensors["adversarial"].shape != tensors["original"].shape:
        raise ArtifactError(f"{path}: adversarial and original images differ in shape")
