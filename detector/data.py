"""Datasets: IDX (Fashion-MNIST, MNIST), CIFAR-10 binary batches, image folders.

Every loader returns an ``ImageSet``: float32 pixels in [0, 1], shape
(N, C, H, W), int64 labels and class names.  Files are checked as they are
read, and a bad file raises ``DatasetError`` naming the file and the fault.
CIFAR-10 is read from its *binary* distribution: the python version is a
pickle and is never opened.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import zlib
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import sha256_file

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
    images: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]

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
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def head(self, n: int) -> "ImageSet":
        return self.subset(torch.arange(min(n, len(self))))


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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_folder(root: str | os.PathLike, channels: int = 1, size: int | None = None) -> ImageSet:
    """A folder with one sub-folder per class (sorted names = class order).

    Every image is converted to ``channels`` (1 = grey, 3 = RGB); all must
    have one size, or ``size`` resizes them to size x size.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise DatasetError(f"{root}: no class sub-folders")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    mode = {1: "L", 3: "RGB"}[channels]
    arrays, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert(mode)
                    if size is not None and img.size != (size, size):
                        img = img.resize((size, size), Image.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise DatasetError(f"{file}: not a readable image ({exc})") from exc
            if arrays and array.shape != arrays[0].shape:
                raise DatasetError(
                    f"{file}: size {array.shape[:2]} differs from {arrays[0].shape[:2]}; pass size= to resize"
                )
            arrays.append(array)
            labels.append(label)
    if not arrays:
        raise DatasetError(f"{root}: no images found in its class folders")
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[:, None]
    else:
        stacked = stacked.transpose(0, 3, 1, 2)
    tensor = torch.from_numpy(stacked.astype(np.float32) / 255.0)
    return ImageSet(tensor, torch.tensor(labels, dtype=torch.int64), tuple(p.name for p in class_dirs))


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

DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder")


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None, **folder_options) -> ImageSet:
    """Load ``split`` ('train' or 'test') of a named dataset.

    ``root`` defaults to Debian's Fashion-MNIST directory for fashion-mnist;
    for ``folder``, root is the image folder itself (split is ignored).
    """
    if name == "fashion-mnist":
        return load_idx_split(root or DEFAULT_FASHION_MNIST_DIR, split, FASHION_MNIST_CLASSES)
    if name == "mnist":
        if root is None:
            raise ValueError("mnist needs a root directory holding its IDX files")
        return load_idx_split(root, split, MNIST_CLASSES)
    if name == "cifar10":
        if root is None:
            raise ValueError("cifar10 needs a root directory holding its binary batches")
        return load_cifar10(root, split)
    if name == "folder":
        if root is None:
            raise ValueError("folder needs a root directory")
        return load_image_folder(root, **folder_options)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a seeded, reproducible train/validation split of n items."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]
