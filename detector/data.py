"""Datasets: IDX (Fashion-MNIST, MNIST), CIFAR-10 binary batches, image folders.

Every loader returns an ``ImageSet``: float32 pixels in [0, 1], shape
(N, C, H, W), int64 labels and class names.  Files are checked as they are
read, and a bad file raises ``DatasetError`` naming the file and the fault.
CIFAR-10 is read from its *binary* distribution: the python version is a
pickle and is never opened.

A ``DataSpec`` names the data (dataset, root, image size, channels, resize
rule, held-out test split) and ``load_split(spec, 'train' | 'test')`` loads
it; nothing is converted silently: every conversion is an option of the
spec and is counted in the ImageSet's ``notes``.  ``resolve_spec`` fills in
what was inferred (channels, classes, shape, a folder's fingerprint) so a
bundle can record it and reload the same data.  Normalisation statistics
come from the training images (``normalisation_stats``); leak-free splits
and stratified samples from ``splits``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import zlib
import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .artifacts import sha256_file
from .splits import REST, stratified_sample, stratified_split

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_COUNTS = {"train": 60000, "test": 10000}

# Pinned digests of the published files, as "algorithm:hex".  A download
# that does not match is rejected rather than trained on.
#   sha256-content: SHA-256 of the *decompressed* IDX bytes, so a mirror that
#     recompressed the same data (Debian's package does) verifies too; these
#     were computed from Debian's dataset-fashion-mnist package.
#   md5: the only digest MNIST's and CIFAR-10's authors publish; kept as it
#     is rather than inventing a SHA-256 we could not check against a
#     trusted copy.  Pass sha256= to download_file to pin your own.
DOWNLOADS = {
    "fashion-mnist": {
        "base_url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "files": {
            "train-images-idx3-ubyte.gz": "sha256-content:c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz": "sha256-content:bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz": "sha256-content:5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz": "sha256-content:0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    },
    "mnist": {
        "base_url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "files": {
            "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "cifar10": {
        "base_url": "https://www.cs.toronto.edu/~kriz/",
        "files": {"cifar-10-binary.tar.gz": "md5:c32a1d4ab5d03f1284b67883e8d87530"},
    },
}


class DatasetError(ValueError):
    """A data file is missing, truncated, mislabelled or of the wrong kind."""


@dataclass
class ImageSet:
    """Pixels, labels and class names; ``notes`` says in words what loading
    converted (colour to grey, resizing, alpha, ...) and ``spec`` is the
    resolved :class:`DataSpec` that reloads the same data (None when the set
    was built by hand)."""

    images: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    spec: DataSpec | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DatasetError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes, list(self.notes), self.spec)

    def head(self, n: int) -> "ImageSet":
        return self.subset(torch.arange(min(n, len(self))))

    def to(self, device: torch.device | str) -> "ImageSet":
        """The same set with its pixels and labels on ``device``."""
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, list(self.notes), self.spec)

    def sample(self, n: int, seed: int, mask=None, *, shrink: bool = False) -> "ImageSet":
        """``n`` images drawn class-stratified and seeded (see
        :func:`splits.stratified_sample`) among those where ``mask`` holds;
        use this, not :meth:`head`, for evaluation sets."""
        notes = list(self.notes)
        index = stratified_sample(self.labels, n, seed, mask, shrink=shrink, notes=notes, what="images")
        picked = self.subset(index)
        picked.notes = notes
        return picked


# --------------------------------------------------------------------- IDX

def _open_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return raw


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (uint8 data), gzipped or not, checking its header."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    data = _open_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    if expected_ndim is not None and ndim != expected_ndim:
        raise DatasetError(f"{path}: expected {expected_ndim} dimensions, header says {ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: header truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(dims))
    payload = len(data) - header_len
    if payload != expected:
        raise DatasetError(
            f"{path}: truncated or padded: header promises {expected} bytes of data for shape {dims}, "
            f"file holds {payload}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{root / stem}[.gz]: file not found")


def load_idx_split(root: str | os.PathLike, split: str, classes: tuple[str, ...]) -> ImageSet:
    """Load the train or test split of an MNIST-format dataset directory."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    image_path, label_path = (_find_idx(root, stem) for stem in IDX_FILES[split])
    images = read_idx(image_path, expected_ndim=3)
    labels = read_idx(label_path, expected_ndim=1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
        )
    if labels.size and int(labels.max()) >= len(classes):
        raise DatasetError(
            f"{label_path}: label {int(labels.max())} out of range for {len(classes)} classes (mislabelled file?)"
        )
    tensor = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return ImageSet(tensor, torch.from_numpy(labels.astype(np.int64)), classes)


# ----------------------------------------------------------------- CIFAR-10

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch.bin",)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    raw = path.read_bytes()
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise DatasetError(
            f"{path}: size {len(raw)} is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records (truncated?)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DatasetError(f"{path}: label {int(labels.max())} out of range 0..9 (not a CIFAR-10 binary batch?)")
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return images, labels


def load_cifar10(root: str | os.PathLike, split: str) -> ImageSet:
    """CIFAR-10 from the directory holding its binary batches
    (``cifar-10-batches-bin`` of the binary distribution)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    names = CIFAR_TRAIN_BATCHES if split == "train" else CIFAR_TEST_BATCHES
    parts = [read_cifar_batch(root / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    tensor = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ImageSet(tensor, torch.from_numpy(labels), CIFAR10_CLASSES)

# ------------------------------------------------------------ image folder
#
# Layouts: root/train/<class>/ + root/test/<class>/, or root/<class>/ with
# the test split held out (test_fraction of each class, seeded).  Class
# order is the sorted folder names of the training folder.  Files with an
# image suffix are read; other entries are ignored and counted in a note;
# names starting with "." (.DS_Store, .ipynb_checkpoints) are skipped.
#
# Reading one image (``convert_image``), every change counted in the notes:
#   * unreadable or truncated file, zero-size image, float pixels (mode F),
#     32-bit integers beyond 16 bits: DatasetError naming the file;
#   * animated (GIF, APNG, WebP, TIFF pages): the first frame is used;
#   * 16-bit grey: scaled by 1/65535 (kept in float, no 8-bit rounding);
#   * alpha or a transparent palette entry: composited onto black;
#   * palette, 1-bit, CMYK, YCbCr, ...: converted to grey or RGB;
#   * channels=1 and a colour image: Pillow's "L" (0.299 R + 0.587 G +
#     0.114 B); channels=3 and a grey image: the grey channel repeated;
#   * then ``fit_size`` to the target size.

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LUMA = (0.299, 0.587, 0.114)
GREY_MODES = {"1", "L", "LA", "La", "I", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
RESIZE_TEXT = {
    "pad": "pad: scaled to fit keeping the aspect ratio, centred, the rest filled with the "
           "mean of the image's outermost rows and columns",
    "crop": "crop: the largest centred region of the target's aspect ratio, scaled to the target",
    "stretch": "stretch: scaled to the target, aspect ratio not kept",
}
TALLY_TEXT = {
    "frame": "took the first frame of {n} animated image(s)",
    "16bit": "scaled {n} 16-bit image(s) to [0, 1] (value / 65535)",
    "alpha": "composited {n} image(s) with transparency onto black",
    "to_grey": "converted {n} colour image(s) to grey (Pillow 'L': 0.299 R + 0.587 G + 0.114 B)",
    "to_rgb": "repeated the grey channel of {n} image(s) to make 3 channels",
    "resize": "resized {n} image(s) to {size} ({rule})",
}


@contextmanager
def _named(path):
    """Any failure reading ``path`` becomes a DatasetError naming it."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...) for one bad file
        raise DatasetError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def _count(tally: dict | None, key: str, where) -> None:
    if tally is not None:
        tally.setdefault(key, []).append(str(where))


def _is_colour(img) -> bool:
    """Stored in colour: a colour mode, or a palette with a non-grey entry."""
    if img.mode in ("P", "PA"):
        rgb = np.asarray(img.getpalette() or [0, 0, 0], dtype=np.int64).reshape(-1, 3)
        return bool((rgb != rgb[:, :1]).any())
    return not (img.mode in GREY_MODES or img.mode.startswith("I;16"))


def _flatten(img, where, tally):
    """An 8-bit image as "L" (grey sources) or "RGB" (colour sources)."""
    grey = not _is_colour(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            _count(tally, "alpha", where)
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        img = rgba.convert("RGB")
    elif img.mode not in ("L", "RGB"):
        if img.mode not in ("1", "P"):  # those two convert without loss
            _count(tally, f"mode {img.mode}", where)
        img = img.convert("RGB")
    return img.convert("L") if grey and img.mode == "RGB" else img


def _deep_pixels(img, channels: int, where, tally) -> np.ndarray:
    """16-bit grey (mode I;16* or I) as float in [0, 1]."""
    if img.mode == "F":
        raise DatasetError(f"{where}: floating-point pixels (mode F) are not supported; "
                           f"save the image with 8 or 16 bits per channel")
    raw = np.asarray(img)
    low, high = int(raw.min()), int(raw.max())
    if low < 0 or high > 65535:
        raise DatasetError(f"{where}: 32-bit integer pixels ({low}..{high}) do not fit 16 bits; "
                           f"save the image with 8 or 16 bits per channel")
    _count(tally, "16bit", where)
    grey = (raw.astype(np.float32) / 65535.0)[:, :, None]
    if channels == 3:
        _count(tally, "to_rgb", where)
        grey = np.repeat(grey, 3, axis=2)
    return grey


def _pixels(img, channels: int, where, tally) -> np.ndarray:
    """(H, W, channels) float32 in [0, 1]."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _deep_pixels(img, channels, where, tally)
    img = _flatten(img, where, tally)
    if channels == 1 and img.mode == "RGB":
        _count(tally, "to_grey", where)
        img = img.convert("L")
    elif channels == 3 and img.mode == "L":
        _count(tally, "to_rgb", where)
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.float32) / 255.0
    return array[:, :, None] if array.ndim == 2 else array


def _resample(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's bilinear resampling (antialiased when shrinking), per channel, in float."""
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, c], dtype=np.float32))
                         .resize((width, height), Image.Resampling.BILINEAR)) for c in range(array.shape[2])]
    return np.clip(np.stack(planes, axis=2), 0.0, 1.0)


def fit_size(array: np.ndarray, size: tuple[int, int], resize: str, where="image", tally: dict | None = None):
    """Bring an (H, W, C) float image to ``size`` = (height, width).

    pad: scale by min(height/H, width/W) (the longer side, relative to the
      target, fits exactly), centre it (extra pixel right/bottom) and fill
      the rest, per channel, with the mean of the image's outermost rows
      and columns (its border or background value; 0 for a black border).
    crop: take the largest centred region with the target's aspect ratio
      (that is: scale the shorter side to fit, centre-crop the longer) and
      scale it to the target.
    stretch: scale to the target; the aspect ratio is not kept.
    none: a size mismatch raises DatasetError naming ``where``.
    Scaling is Pillow's bilinear filter in float (antialiased when
    shrinking); an image already at ``size`` is returned unchanged.
    """
    height, width = array.shape[:2]
    target_h, target_w = size
    if (height, width) == (target_h, target_w):
        return array
    if resize == "none":
        raise DatasetError(f"{where}: {width}x{height} pixels, expected {target_w}x{target_h}; "
                           f"resize='none' refuses a size mismatch (choose 'pad', 'crop' or 'stretch')")
    if resize not in RESIZE_TEXT:
        raise ValueError(f"resize must be one of {RESIZE_RULES}, got {resize!r}")
    _count(tally, "resize", where)
    if resize == "stretch":
        return _resample(array, target_w, target_h)
    if resize == "crop":
        scale = max(target_w / width, target_h / height)
        crop_w, crop_h = min(width, round(target_w / scale)), min(height, round(target_h / scale))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return _resample(array[top:top + crop_h, left:left + crop_w], target_w, target_h)
    scale = min(target_w / width, target_h / height)
    new_w = min(target_w, max(1, round(width * scale)))
    new_h = min(target_h, max(1, round(height * scale)))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]]).astype(np.float64)
    canvas = np.empty((target_h, target_w, array.shape[2]), dtype=np.float32)
    canvas[:] = border.mean(axis=0)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = _resample(array, new_w, new_h)
    return canvas


def convert_image(img, channels: int, size: tuple[int, int], resize: str, where="image",
                  tally: dict | None = None) -> np.ndarray:
    """One opened Pillow image (its current frame) as a (C, H, W) float32
    array in [0, 1] with ``channels`` channels at ``size`` = (height, width),
    by the rules above.  ``tally`` (a dict) collects, per kind of change,
    the ``where`` of each image changed; errors name ``where``."""
    if img.size[0] == 0 or img.size[1] == 0:
        raise DatasetError(f"{where}: zero-size image ({img.size[0]}x{img.size[1]} pixels)")
    array = fit_size(_pixels(img, channels, where, tally), size, resize, where, tally)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


def _read_image(path: Path, channels: int, size: tuple[int, int], resize: str, tally: dict) -> np.ndarray:
    with _named(path), Image.open(path) as img:
        if getattr(img, "n_frames", 1) > 1:
            _count(tally, "frame", path)
            img.seek(0)
        img.load()
        return convert_image(img, channels, size, resize, path, tally)


def _probe(path: Path) -> tuple[int, int, bool]:
    """(width, height, stored in colour) from the header, without decoding."""
    with _named(path), Image.open(path) as img:
        width, height = img.size
        colour = _is_colour(img)
    if width == 0 or height == 0:
        raise DatasetError(f"{path}: zero-size image ({width}x{height} pixels)")
    return width, height, colour


@dataclass
class _Listing:
    classes: tuple[str, ...]
    files: list[Path]
    labels: np.ndarray

    def select(self, index) -> "_Listing":
        index = np.asarray(index, dtype=np.int64)
        return _Listing(self.classes, [self.files[i] for i in index], self.labels[index])


def _examples(wheres: list[str], root: Path, most: int = 3) -> str:
    def short(where: str) -> str:
        try:
            return Path(where).relative_to(root).as_posix()
        except ValueError:
            return where
    more = f", +{len(wheres) - most} more" if len(wheres) > most else ""
    return ", ".join(short(w) for w in wheres[:most]) + more


def _list_class_folders(root: Path, classes: tuple[str, ...] | None = None) -> tuple[_Listing, list[str]]:
    """Image files of root/<class>/.  With ``classes`` (the training
    classes, for a test folder) a class may be absent but not unknown."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DatasetError(f"{root}: no class sub-folders")
    names = tuple(p.name for p in dirs) if classes is None else tuple(classes)
    stray = [p for p in dirs if p.name not in names]
    if stray:
        raise DatasetError(f"{stray[0]}: class {stray[0].name!r} is not one of the training classes {list(names)}")
    files, labels, ignored = [], [], []
    for folder in dirs:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        kept = set(images)
        ignored += [str(p) for p in entries if p not in kept]
        if not images and classes is None:
            raise DatasetError(f"{folder}: class folder holds no images (suffixes {sorted(IMAGE_SUFFIXES)})")
        files += images
        labels += [names.index(folder.name)] * len(images)
    if not files:
        raise DatasetError(f"{root}: no images found in its class folders")
    notes = []
    present = set(labels)
    missing = [name for k, name in enumerate(names) if k not in present]
    if missing:
        notes.append(f"{root}: no images of class(es) {missing}")
    if ignored:
        notes.append(f"{root}: ignored {len(ignored)} entries that are not image files ({_examples(ignored, root)})")
    return _Listing(names, files, np.asarray(labels, dtype=np.int64)), notes


def _detect_layout(root: Path) -> str:
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train and has_test:
        return "train-test"
    if has_train or has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise DatasetError(f"{root}: has {present}/ but no {absent}/; give root/train/<class>/ and "
                           f"root/test/<class>/, or root/<class>/ (the test split is then held out from it), "
                           f"or set layout='single' if {present!r} is a class")
    return "single"


def _split_listing(spec: DataSpec, split: str) -> tuple[_Listing, list[str]]:
    """The files of ``split`` ('train', 'test' or 'all' of a single folder)."""
    root = Path(spec.root)
    if spec.layout == "train-test":
        if split == "all":
            raise DatasetError(f"{root}: holds train/ and test/; load each with "
                               f"load_split(DataSpec('folder', root), 'train' | 'test')")
        if split == "train":
            return _list_class_folders(root / "train")
        classes = spec.classes or _list_class_folders(root / "train")[0].classes
        listing, notes = _list_class_folders(root / "test", classes)
        extra = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and p.name not in ("train", "test") and not p.name.startswith("."))
        return listing, notes + ([f"{root}: ignored folder(s) {extra} beside train/ and test/"] if extra else [])
    listing, notes = _list_class_folders(root)
    if split == "all":
        return listing, notes
    parts = stratified_split(listing.labels, {"test": spec.test_fraction}, spec.split_seed)
    index = parts["test"] if split == "test" else parts[REST]
    notes.append(f"{split} split: {len(index)} of the {len(listing.files)} images of {root}; the test split is "
                 f"{spec.test_fraction:g} of each class, held out with seed {spec.split_seed}")
    return listing.select(index), notes + parts.notes


def folder_fingerprint(root: str | os.PathLike) -> str:
    """Digest of the relative names and byte sizes of the image files under root."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _check_fingerprint(spec: DataSpec) -> tuple[str, list[str]]:
    current = folder_fingerprint(spec.root)
    if spec.fingerprint is None or spec.fingerprint == current:
        return current, []
    message = f"{spec.root}: the image files differ from those the data spec recorded (names or sizes changed)"
    if spec.layout == "single":
        raise DatasetError(message + "; the held-out test split would not be the recorded one and images could "
                                     "leak between training and test")
    return current, [message]


def _common_size(files: list[Path], probes: list[tuple[int, int, bool]]) -> tuple[int, int]:
    """(height, width) shared by every image, else an error naming the odd file."""
    width, height = probes[0][:2]
    for path, (w, h, _) in zip(files, probes):
        if (w, h) != (width, height):
            raise DatasetError(
                f"{path}: {w}x{h} pixels but {files[0]} is {width}x{height}; images of mixed sizes need an image "
                f"size to bring them to (DataSpec.image_size / --image-size N; size= for load_image_folder) and a "
                f"resize rule ('pad', 'crop' or 'stretch')"
            )
    return height, width


def _resolve_folder(spec: DataSpec, scope: str = "train") -> tuple[DataSpec, list[str]]:
    """Layout, fingerprint, classes, channels (inferred from the ``scope``
    images when None) and shape of a folder spec."""
    spec = replace(spec, layout=spec.layout or _detect_layout(Path(spec.root)))
    fingerprint, notes = _check_fingerprint(spec)
    listing, _ = _split_listing(spec, scope)
    if spec.classes is not None and listing.classes != spec.classes:
        raise DatasetError(f"{spec.root}: classes {list(listing.classes)} differ from the recorded {list(spec.classes)}")
    channels, shape = spec.channels, spec.shape
    probes = None
    if channels is None or (shape is None and spec.image_size is None):
        probes = [_probe(path) for path in listing.files]
    if channels is None:
        colour = [str(path) for path, probe in zip(listing.files, probes) if probe[2]]
        channels = 3 if colour else 1
        what = "training images" if scope == "train" else "images"
        detail = (f"{len(colour)} of {len(probes)} {what} are stored in colour "
                  f"({_examples(colour, Path(spec.root))}); pass channels=1 for grey") if colour else \
            f"all {len(probes)} {what} are grey"
        notes.append(f"inferred channels={channels}: {detail}")
    if shape is None:
        side = spec.image_size
        shape = (channels, side, side) if side else (channels, *_common_size(listing.files, probes))
    return replace(spec, channels=channels, classes=listing.classes, shape=shape, fingerprint=fingerprint), notes


def _load_folder(spec: DataSpec, split: str) -> ImageSet:
    resolved, notes = _resolve_folder(spec, "all" if split == "all" else "train")
    listing, split_notes = _split_listing(resolved, split)
    channels, height, width = resolved.shape
    tally: dict[str, list[str]] = {}
    arrays = [_read_image(path, channels, (height, width), resolved.resize, tally) for path in listing.files]
    notes += split_notes
    notes += _tally_notes(tally, (height, width), resolved.resize, Path(resolved.root))
    data = ImageSet(torch.from_numpy(np.stack(arrays)), torch.from_numpy(listing.labels), resolved.classes,
                    notes, resolved)
    _check_recorded(spec, data, resolved.root)
    return data


def _tally_notes(tally: dict[str, list[str]], size: tuple[int, int], resize: str, root: Path) -> list[str]:
    """One note per kind of conversion, with a few of the images it touched."""
    height, width = size
    notes = []
    for key, wheres in tally.items():
        template = TALLY_TEXT.get(key, "converted {n} image(s) from " + key + " to RGB")
        text = template.format(n=len(wheres), size=f"{width}x{height}", rule=RESIZE_TEXT.get(resize))
        notes.append(f"{text} ({_examples(wheres, root)})")
    return notes


def load_unlabelled_images(root: str | os.PathLike, channels: int, size: tuple[int, int],
                           resize: str = "pad") -> tuple[torch.Tensor, list[str]]:
    """Every image file under ``root`` (searched recursively, in sorted path
    order; no labels: e.g. a deployment's own clean traffic) as (N, C, H, W)
    float32 in [0, 1] with ``channels`` channels at ``size`` = (height,
    width), converted by the rules above (``resize``: see ``fit_size``), and
    notes saying what was converted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{root}: holds no images (suffixes {sorted(IMAGE_SUFFIXES)})")
    tally: dict[str, list[str]] = {}
    arrays = [_read_image(path, channels, size, resize, tally) for path in files]
    return torch.from_numpy(np.stack(arrays)), _tally_notes(tally, size, resize, root)


def load_image_folder(root: str | os.PathLike, channels: int | None = 1, size: int | None = None,
                      resize: str = "pad") -> ImageSet:
    """Every image of a folder with one sub-folder per class (sorted names =
    class order), no split: for a train/test split use :func:`load_split`.

    ``channels``: 1 = grey, 3 = RGB, None = inferred (3 if any image is
    stored in colour).  Images of mixed sizes need ``size`` (a square side)
    and are brought to it by ``resize`` (see ``fit_size``).  ``.notes``
    says what was converted.
    """
    root = Path(root)
    if _detect_layout(root) == "train-test":
        raise DatasetError(f"{root}: holds train/ and test/; load each with "
                           f"load_split(DataSpec('folder', root), 'train' | 'test')")
    spec = DataSpec("folder", os.fspath(root), image_size=size, channels=channels, resize=resize, layout="single")
    return _load_folder(spec, "all")


# ------------------------------------------------------------- data spec

DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder")
SPLITS = ("train", "test")
RESIZE_RULES = ("pad", "crop", "stretch", "none")
FOLDER_LAYOUTS = ("train-test", "single")
# (channels, side, classes) of the datasets with a fixed format.
NATIVE = {
    "fashion-mnist": (1, 28, FASHION_MNIST_CLASSES),
    "mnist": (1, 28, MNIST_CLASSES),
    "cifar10": (3, 32, CIFAR10_CLASSES),
}


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to load the same data again (a bundle stores it).

    dataset: one of DATASETS.  root: the data directory (None = Debian's
    Fashion-MNIST for fashion-mnist).  image_size: side of the square the
    images are brought to (None = their own size).  channels: 1 (grey) or 3
    (RGB); None = the dataset's own, for a folder inferred from its training
    images (3 if any is stored in colour).  resize: how an image of another
    size is brought to image_size: "pad", "crop", "stretch" or "none"
    (refuse a size mismatch); see ``fit_size``.
    Folders only: layout ("train-test" = root/train/<class>/ and
    root/test/<class>/; "single" = root/<class>/ with the test split held
    out; None = detect), test_fraction and split_seed (the held-out test
    split of the single layout: that fraction of each class).
    Recorded by :func:`resolve_spec` and checked on reload: classes, shape
    (C, H, W) and, for folders, fingerprint (a digest of the image files'
    names and byte sizes).
    """

    dataset: str = "fashion-mnist"
    root: str | None = None
    image_size: int | None = None
    channels: int | None = None
    resize: str = "pad"
    test_fraction: float = 0.2
    split_seed: int = 0
    layout: str | None = None
    classes: tuple[str, ...] | None = None
    shape: tuple[int, int, int] | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        if self.root is not None:
            object.__setattr__(self, "root", os.fspath(self.root))
        for name in ("classes", "shape"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None (the data's own), got {self.channels!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.layout not in (None, *FOLDER_LAYOUTS):
            raise ValueError(f"layout must be one of {FOLDER_LAYOUTS} or None, got {self.layout!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.dataset == "folder" and self.root is None:
            raise ValueError("dataset 'folder' needs a root directory")

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples as lists); ``from_json`` reads it back."""
        out = asdict(self)
        for name in ("classes", "shape"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, data: Mapping | str) -> "DataSpec":
        """A spec from ``to_json``'s dict (or its JSON text); unknown keys are refused."""
        if isinstance(data, str):
            data = json.loads(data)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"data spec has unknown field(s) {unknown}")
        return cls(**data)


def resolve_spec(spec: DataSpec) -> DataSpec:
    """``spec`` with channels, classes, shape (and for folders layout and
    fingerprint) filled in, as a bundle should record it."""
    return _resolve(spec)[0]


def _resolve(spec: DataSpec) -> tuple[DataSpec, list[str]]:
    if spec.dataset == "folder":
        return _resolve_folder(spec)
    native_channels, side, classes = NATIVE[spec.dataset]
    channels = spec.channels or native_channels
    size = spec.image_size or side
    return replace(spec, channels=channels, classes=spec.classes or classes,
                   shape=spec.shape or (channels, size, size)), []


def _check_recorded(spec: DataSpec, data: ImageSet, where) -> None:
    """A reload must give the classes and shape the spec recorded."""
    if spec.classes is not None and tuple(data.classes) != tuple(spec.classes):
        raise DatasetError(f"{where}: classes {list(data.classes)} differ from the recorded {list(spec.classes)}")
    if spec.shape is not None and tuple(data.shape) != tuple(spec.shape):
        raise DatasetError(f"{where}: images load as {tuple(data.shape)} (C, H, W), "
                           f"the spec recorded {tuple(spec.shape)}")


def load_split(spec: DataSpec, split: str) -> ImageSet:
    """``split`` ('train' or 'test') of the data ``spec`` names, brought to
    its channels and image size; ``.notes`` says what was converted and
    ``.spec`` is the resolved spec."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec.dataset == "folder":
        return _load_folder(spec, split)
    resolved, _ = _resolve(spec)
    if spec.root is None and spec.dataset != "fashion-mnist":
        holding = "binary batches" if spec.dataset == "cifar10" else "IDX files"
        raise ValueError(f"{spec.dataset} needs a root directory holding its {holding}")
    if spec.dataset == "cifar10":
        raw = load_cifar10(spec.root, split)
    else:
        raw = load_idx_split(spec.root or DEFAULT_FASHION_MNIST_DIR, split, NATIVE[spec.dataset][2])
    images, notes = _conform_tensor(raw.images, resolved, spec.dataset)
    data = ImageSet(images, raw.labels, raw.classes, notes, resolved)
    _check_recorded(spec, data, spec.root or spec.dataset)
    return data


def _conform_tensor(images: torch.Tensor, spec: DataSpec, where: str) -> tuple[torch.Tensor, list[str]]:
    """Channels and size of a fixed-format dataset (square images): colour
    to grey by 0.299 R + 0.587 G + 0.114 B, grey to colour by repetition,
    size by antialiased bilinear resampling (pad, crop and stretch agree for
    square to square)."""
    notes = []
    n, channels, side = len(images), images.shape[1], images.shape[-1]
    if spec.channels == 3 and channels == 1:
        images = images.repeat(1, 3, 1, 1)
        notes.append(f"repeated the grey channel of {n} images to make 3 channels")
    elif spec.channels == 1 and channels == 3:
        weights = torch.tensor(LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        images = (images * weights).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)
        notes.append(f"converted {n} colour images to grey (0.299 R + 0.587 G + 0.114 B)")
    size = spec.image_size
    if size is not None and size != side:
        if spec.resize == "none":
            raise DatasetError(f"{where}: images are {side}x{side} but image_size is {size} "
                               f"and resize='none' refuses a size mismatch")
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True).clamp_(0.0, 1.0)
        notes.append(f"resized {n} images from {side}x{side} to {size}x{size} (bilinear, antialiased)")
    return images, notes


def normalisation_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (population, ddof 0) of
    ``images`` (an ImageSet or an (N, C, H, W) tensor), accumulated in
    float64 in chunks, two passes.  Compute them from the *training* images
    only.  A constant channel (std 0) raises DatasetError: normalising by it
    would divide by zero."""
    tensor = images.images if isinstance(images, ImageSet) else torch.as_tensor(images)
    if tensor.ndim != 4 or tensor.numel() == 0:
        raise DatasetError(f"normalisation_stats needs a non-empty (N, C, H, W) batch, got {tuple(tensor.shape)}")
    count = tensor.numel() // tensor.shape[1]
    chunks = torch.split(tensor, 4096)
    total = sum(c.to(torch.float64).sum(dim=(0, 2, 3)) for c in chunks)
    mean = total / count
    squares = sum(((c.to(torch.float64) - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) for c in chunks)
    std = torch.sqrt(squares / count)
    flat = [c for c, s in enumerate(std.tolist()) if s <= 1e-12]
    if flat:
        raise DatasetError(f"channel(s) {flat} have the same value in every pixel (std 0); cannot normalise")
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------- download

def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Digest of a file for a pinned "algorithm:hex" entry."""
    if algorithm == "sha256":
        return sha256_file(path)
    if algorithm == "sha256-content":
        return hashlib.sha256(_open_maybe_gzip(Path(path))).hexdigest()
    if algorithm == "md5":
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


def _split_pin(pin: str) -> tuple[str, str]:
    algorithm, _, expected = pin.rpartition(":")
    return (algorithm or "sha256"), expected.lower()


def download_file(url: str, destination: str | os.PathLike, pin: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` atomically and verify it.

    ``pin`` is "algorithm:hex" (a bare hex string means SHA-256).  An
    existing file that already matches is kept.  A mismatch raises
    DatasetError and leaves nothing under the destination name.
    """
    algorithm, expected = _split_pin(pin)
    destination = Path(destination)
    if destination.is_file():
        try:
            if file_digest(destination, algorithm) == expected:
                return destination
        except DatasetError:
            pass  # a corrupt leftover: download again
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as exc:
            raise DatasetError(f"{url}: download failed ({exc})") from exc
        try:
            actual = file_digest(tmp_name, algorithm)
        except DatasetError as exc:
            raise DatasetError(f"{url}: downloaded file is corrupt ({exc}); file rejected") from exc
        if actual != expected:
            # A stale file under the destination name must not be loaded later either.
            destination.unlink(missing_ok=True)
            raise DatasetError(f"{url}: {algorithm} mismatch (expected {expected}, got {actual}); file rejected")
        os.replace(tmp_name, destination)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return destination


def download_dataset(name: str, root: str | os.PathLike, base_url: str | None = None) -> Path:
    """Fetch a dataset's published files into ``root`` (verified). For
    CIFAR-10 the tarball is unpacked to ``root/cifar-10-batches-bin``."""
    if name not in DOWNLOADS:
        raise ValueError(f"no download known for {name!r}; choose one of {sorted(DOWNLOADS)}")
    spec = DOWNLOADS[name]
    base = base_url or spec["base_url"]
    root = Path(root)
    for filename, pin in spec["files"].items():
        path = download_file(base.rstrip("/") + "/" + filename, root / filename, pin)
        if filename.endswith(".tar.gz"):
            import tarfile

            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".bin")]
                tar.extractall(root, members=members, filter="data")
    return root

# ----------------------------------------------------------------- entry


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None, **options) -> ImageSet:
    """Load ``split`` ('train' or 'test') of a named dataset: shorthand for
    ``load_split(DataSpec(name, root, **options), split)``.

    ``root`` defaults to Debian's Fashion-MNIST directory for fashion-mnist;
    for ``folder`` it is the image folder (root/train + root/test, or one
    folder per class with the test split held out).  ``options`` are
    DataSpec fields (``size`` is accepted for ``image_size``).
    """
    if "size" in options:
        options["image_size"] = options.pop("size")
    spec = DataSpec(name, None if root is None else os.fspath(root), **options)
    return load_split(spec, split)


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a seeded, reproducible train/validation split of n items
    (not stratified; kept exactly as it is so that recorded splits
    reproduce: use ``splits.stratified_split`` for new splits)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]
