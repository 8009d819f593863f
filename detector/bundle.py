"""A model bundle: one directory holding everything needed to detect.

    architecture.json   backbone, input shape, normalisation, class names
    decoupled.safetensors  weights of the decoupled (gated) network
    plain.safetensors   weights of the plain reference network
    training.json       training configuration and per-epoch history
    data.json           the data it was trained on (data.DataSpec: dataset, root,
                        image size, channels, resize rule, classes, shape),
                        the train/validation split and the input normalisation
    model_card.json     measured figures (accuracy, sparsity, paths, detection)
    profile.safetensors / profile.json   the fitted detector (after `fit`):
                        its tensors, and its name, parameters, threshold
                        and fit summary (format: DETECTOR_VERSION)
    manifest.json       SHA-256 of every file above

Loading verifies the manifest first, so a tampered or truncated bundle is
refused as a whole instead of being half-loaded.  This module is the only
one that knows these file names (docs/contracts.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifacts import (
    ArtifactError, atomic_save_tensors, atomic_write_json, load_tensors, manifest_digest,
    read_json, verify_manifest, write_manifest,
)
from .base import Detector
from .data import DataSpec
from .models import Architecture, ConvNet
from .profile import ProfileMismatch
from .scores import PathScore

ARCHITECTURE_FILE = "architecture.json"
DECOUPLED_FILE = "decoupled.safetensors"
PLAIN_FILE = "plain.safetensors"
TRAINING_FILE = "training.json"
CARD_FILE = "model_card.json"
DATA_FILE = "data.json"
DETECTOR_TENSORS = "profile.safetensors"
DETECTOR_CONFIG = "profile.json"
BUNDLE_FORMAT = 1
# The files the decoupled model's outputs depend on (architecture and
# normalisation, weights, data split): Bundle.model_digest.
MODEL_FILES = (ARCHITECTURE_FILE, DECOUPLED_FILE, DATA_FILE)
# 1: PathDetector of release 0.1 ({"score": name, ...}); 2: any registered
# Detector ({"detector": name, "params": ..., "threshold": ...}).
DETECTOR_VERSION = 2

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "fmnist-default"


@dataclass
class Bundle:
    path: Path
    arch: Architecture
    classes: tuple[str, ...]
    decoupled: ConvNet
    plain: ConvNet
    training: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)
    digest: str = ""
    # Files the verified manifest vouches for; empty when loaded unverified.
    verified_files: frozenset = frozenset()
    data: dict = field(default_factory=dict)
    # What an attack set depends on (MODEL_FILES), not the detector or the
    # card: unchanged by a refit, so saved attack sets stay reusable.
    model_digest: str = ""

    def to(self, device: torch.device | str) -> "Bundle":
        """Both networks on ``device`` (in place); returns the bundle."""
        self.decoupled.to(device)
        self.plain.to(device)
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.arch.in_channels, self.arch.image_size, self.arch.image_size)

    def has_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    @property
    def data_spec(self) -> DataSpec:
        """The data the bundle was trained on.  Bundles of release 0.1 have
        no data.json: their training configuration names the dataset."""
        if "spec" in self.data:
            return DataSpec.from_json(self.data["spec"])
        cfg = self.training.get("config", {})
        return DataSpec(cfg.get("dataset", "fashion-mnist"), cfg.get("data_root"))

    @property
    def split(self) -> dict:
        """How the training data was split into train and validation parts."""
        if "split" in self.data:
            return self.data["split"]
        cfg = self.training.get("config", {})
        return {"val_fraction": cfg.get("val_fraction", 0.1), "seed": cfg.get("seed", 0),
                "limit_train": cfg.get("limit_train")}


def _load_weights(model: ConvNet, path: Path) -> ConvNet:
    state = load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit the architecture ({exc})") from exc
    return model.eval()


def load_bundle(path: str | os.PathLike = DEFAULT_BUNDLE, verify: bool = True) -> Bundle:
    """Load a bundle, verifying its manifest unless ``verify`` is False."""
    path = Path(path)
    verified: frozenset = frozenset()
    if verify:
        manifest = verify_manifest(path, required=(ARCHITECTURE_FILE, DECOUPLED_FILE, PLAIN_FILE, CARD_FILE))
        verified = frozenset(manifest["files"])
    meta = read_json(path / ARCHITECTURE_FILE)
    if meta.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{path / ARCHITECTURE_FILE}: unsupported bundle format {meta.get('format')!r}")
    try:
        arch = Architecture.from_json(meta["architecture"])
        classes = tuple(meta["classes"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path / ARCHITECTURE_FILE}: malformed ({exc})") from exc
    if len(classes) != arch.num_classes:
        raise ArtifactError(f"{path / ARCHITECTURE_FILE}: {len(classes)} class names for {arch.num_classes} classes")
    decoupled = _load_weights(ConvNet(arch, gated=True), path / DECOUPLED_FILE)
    plain = _load_weights(ConvNet(arch, gated=False), path / PLAIN_FILE)
    has_training = (TRAINING_FILE in verified) if verify else (path / TRAINING_FILE).is_file()
    training = read_json(path / TRAINING_FILE) if has_training else {}
    card = read_json(path / CARD_FILE)
    has_data = (DATA_FILE in verified) if verify else (path / DATA_FILE).is_file()
    data = read_json(path / DATA_FILE) if has_data else {}
    digest = manifest_digest(path) if (path / "manifest.json").is_file() else ""
    model = _model_digest(manifest["files"]) if verify else ""
    return Bundle(path, arch, classes, decoupled, plain, training, card, digest, verified, data, model)


def _model_digest(files: dict[str, str]) -> str:
    """SHA-256 over the manifest's digests of the files that define the
    decoupled model's answers (MODEL_FILES present in the bundle)."""
    listed = {name: files[name] for name in MODEL_FILES if name in files}
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()


def write_bundle(
    path: str | os.PathLike,
    arch: Architecture,
    classes: tuple[str, ...],
    decoupled: ConvNet,
    plain: ConvNet,
    training: dict,
    card: dict,
    data: dict | None = None,
) -> Path:
    """Write a complete bundle atomically: it is built in a temporary sibling
    directory and renamed into place, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; a bundle is meant to be shared read-only
    try:
        atomic_write_json(staging / ARCHITECTURE_FILE, {
            "format": BUNDLE_FORMAT, "architecture": arch.to_json(), "classes": list(classes),
            "gated_widths": decoupled.gated_widths,
            "path_layout": "gate bits of the gated convolutions, input to output, concatenated",
        })
        atomic_save_tensors(staging / DECOUPLED_FILE, decoupled.state_dict())
        atomic_save_tensors(staging / PLAIN_FILE, plain.state_dict())
        atomic_write_json(staging / TRAINING_FILE, training)
        atomic_write_json(staging / CARD_FILE, card)
        if data is not None:
            atomic_write_json(staging / DATA_FILE, data)
        write_manifest(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def update_bundle_card(path: str | os.PathLike, updates: dict) -> dict:
    """Merge ``updates`` into the model card and refresh the manifest."""
    path = Path(path)
    card = read_json(path / CARD_FILE)
    card.update(updates)
    atomic_write_json(path / CARD_FILE, card)
    write_manifest(path)
    return card


def state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (a best-so-far checkpoint of a GPU run does
    not hold GPU memory, and saves as it is)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ------------------------------------------------------------ the detector

def save_detector(bundle_path: str | os.PathLike, detector: Detector, summary: dict | None = None) -> None:
    """Write a fitted, calibrated detector into the bundle and refresh the
    manifest.  ``summary`` (JSON) records how it was fitted."""
    bundle_path = Path(bundle_path)
    atomic_save_tensors(bundle_path / DETECTOR_TENSORS, detector.state_tensors())
    atomic_write_json(bundle_path / DETECTOR_CONFIG, {
        "version": DETECTOR_VERSION, **detector.config(), **(summary or {})})
    write_manifest(bundle_path)


def _upgrade_v1(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A release-0.1 profile (one PathDetector, score by name) as the
    registered path score it was; the tensors keep their values."""
    score = config["score"]
    tensors = dict(tensors)
    prefix = f"one_class.{score}."
    for key in ("location", "precision"):
        if prefix + key in tensors:
            tensors[f"one_class.{key}"] = tensors[prefix + key]
    return ({"detector": score, "params": {"target_fpr": config["target_fpr"], "smoothing": config["smoothing"]},
             "threshold": config.get("threshold")}, tensors)


def load_detector(bundle: Bundle) -> PathScore:
    """The bundle's fitted path detector; refuses files the manifest does
    not vouch for and a profile fitted on another model."""
    path = bundle.path
    if not bundle.has_file(DETECTOR_CONFIG):
        raise ArtifactError(f"{path}: no profile; run `pathguard fit --bundle {path}` first")
    if bundle.verified_files and not {DETECTOR_CONFIG, DETECTOR_TENSORS} <= bundle.verified_files:
        raise ArtifactError(f"{path}: profile files are not listed in the manifest; refusing to load them")
    config = read_json(path / DETECTOR_CONFIG)
    tensors = load_tensors(path / DETECTOR_TENSORS)
    version = config.get("version")
    if version not in (1, DETECTOR_VERSION):
        raise ArtifactError(f"{path / DETECTOR_CONFIG}: unsupported profile version {version!r}")
    try:
        if version == 1:
            config, tensors = _upgrade_v1(config, tensors)
        detector = Detector.from_saved(config, tensors)
        if not isinstance(detector, PathScore):
            raise ValueError(f"{detector.name} is not a path score")
        detector.profile_.check_fits(bundle.decoupled.gated_widths, bundle.arch.num_classes)
    except (ProfileMismatch, KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: profile does not match the model: {exc}") from exc
    if detector.threshold_ is None:
        raise ArtifactError(f"{path}: the detector has no threshold; run `pathguard fit --bundle {path}`")
    return detector
