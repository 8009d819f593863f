"""Which data a command reads: the bundle's own unless told otherwise.

A bundle records the data it was trained on (detector.bundle: data.json);
fit, measure, attack, evaluate, adaptive and explain read that data by
default, so a folder bundle is never fitted or evaluated on Fashion-MNIST by
accident.  ``--dataset``/``--data-root`` name other data; it is refused
unless its classes and image shape match the model's.  The same
train/validation split as in training is rebuilt from the bundle.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pathguard.detector.bundle import Bundle
from pathguard.detector.data import DatasetError, DataSpec, ImageSet, folder_fingerprint, load_split, train_val_split


def data_spec(bundle: Bundle, dataset: str | None = None, data_root: str | None = None) -> DataSpec:
    """The bundle's data, or the dataset/root given instead (with the
    bundle's image size, channels and resize rule)."""
    spec = bundle.data_spec
    if dataset is None and data_root is None:
        return spec
    dataset = dataset or spec.dataset
    data_root = None if data_root is None else str(Path(data_root).resolve())
    print(f"note: reading {dataset}" + (f" at {data_root}" if data_root else "")
          + f" instead of the bundle's {spec.dataset}" + (f" at {spec.root}" if spec.root else ""))
    return replace(spec, dataset=dataset, root=data_root, layout=None, classes=None, shape=None, fingerprint=None)


def load_for(bundle: Bundle, spec: DataSpec, split: str) -> ImageSet:
    """``split`` of ``spec``, refused unless it fits the model; says what
    the loader converted."""
    data = load_split(spec, split)
    where = f"{spec.dataset}" + (f" at {spec.root}" if spec.root else "") + f" ({split})"
    if tuple(data.classes) != tuple(bundle.classes):
        raise DatasetError(f"{where} has classes {list(data.classes)}, the model {list(bundle.classes)}: "
                           "pass the bundle's own data (leave out --dataset/--data-root)")
    if tuple(data.shape) != tuple(bundle.input_shape):
        raise DatasetError(f"{where} images are {tuple(data.shape)}, the model expects {tuple(bundle.input_shape)}")
    for note in data.notes:
        print(f"note: {where}: {note}")
    return data


def train_validation(bundle: Bundle, spec: DataSpec) -> tuple[ImageSet, ImageSet]:
    """The training split of ``spec``, cut into the bundle's train and
    validation parts exactly as in training."""
    if spec.dataset == "folder" and spec.fingerprint and folder_fingerprint(spec.root) != spec.fingerprint:
        # The split is a seeded shuffle over the files: with other files it is another split, and
        # images the network trained on would land in the validation part.
        raise DatasetError(f"{spec.root}: the image files changed since the bundle was trained, so its "
                           "train/validation split cannot be rebuilt; retrain, or restore the folder")
    full = load_for(bundle, spec, "train")
    split = bundle.split
    n = min(split.get("limit_train") or len(full), len(full))
    train_idx, val_idx = train_val_split(n, split["val_fraction"], split["seed"])
    return full.subset(train_idx), full.subset(val_idx)
