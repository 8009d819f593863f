"""Data loaders, checks and verified download (detector/data.py).

Every fixture is a real file: IDX bytes written with struct, CIFAR-10
binary records, PNGs written with Pillow, and a real HTTP server on
127.0.0.1 for the download paths.
"""

from __future__ import annotations

import gzip
import json
import hashlib
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathguard.detector.data import (
    CIFAR10_CLASSES,
    DOWNLOADS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    DataSpec,
    DatasetError,
    download_dataset,
    download_file,
    file_digest,
    fit_size,
    load_cifar10,
    load_dataset,
    load_idx_split,
    load_image_folder,
    load_split,
    normalisation_stats,
    read_cifar_batch,
    read_idx,
    resolve_spec,
    train_val_split,
)
from pathguard.detector.splits import class_counts

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (same format as conftest's write_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def cifar_records(labels, images) -> bytes:
    out = bytearray()
    for label, image in zip(labels, images):
        out.append(int(label))
        out += np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return bytes(out)


def _write_split(root, images, labels, write_idx, gz, split="train"):
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }[split]
    image_path = write_idx(root / stems[0], images, gz=gz)
    label_path = write_idx(root / stems[1], labels, gz=gz)
    return image_path, label_path


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_split_loads_shapes_values_labels(tmp_path, write_idx, idx_arrays, gz, split):
    images, labels = idx_arrays
    _write_split(tmp_path, images, labels, write_idx, gz, split)
    data = load_idx_split(tmp_path, split, FASHION_MNIST_CLASSES)
    assert data.images.shape == (7, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert data.labels.dtype == torch.int64
    assert data.labels.tolist() == labels.tolist()
    expected = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    assert torch.equal(data.images, expected)
    assert float(data.images[0, 0, 0, 0]) == 0.0
    assert float(data.images[0, 0, 0, 1]) == 1.0
    assert data.classes == FASHION_MNIST_CLASSES
    assert data.shape == (1, 28, 28)
    assert len(data) == 7


def test_read_idx_plain_and_gzip_identical(tmp_path, write_idx, idx_arrays):
    images, _ = idx_arrays
    plain = write_idx(tmp_path / "a-idx3-ubyte", images)
    gzipped = write_idx(tmp_path / "b-idx3-ubyte", images, gz=True)
    assert gzipped.name.endswith(".gz")
    assert gzip.decompress(gzipped.read_bytes()) == plain.read_bytes()
    a, b = read_idx(plain, expected_ndim=3), read_idx(gzipped, expected_ndim=3)
    assert a.dtype == np.uint8 and a.shape == (7, 28, 28)
    assert np.array_equal(a, images) and np.array_equal(b, images)


def test_load_dataset_mnist_uses_digit_classes(tmp_path, write_idx, idx_arrays):
    images, labels = idx_arrays
    _write_split(tmp_path, images, labels, write_idx, gz=True, split="test")
    data = load_dataset("mnist", "test", tmp_path)
    assert data.classes == MNIST_CLASSES
    assert data.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_truncated_images_file_names_file(tmp_path, write_idx, idx_arrays, gz):
    images, labels = idx_arrays
    image_path, _ = _write_split(tmp_path, images, labels, write_idx, gz=False)
    raw = image_path.read_bytes()[:-100]  # drop the last 100 pixel bytes
    if gz:
        image_path.unlink()
        image_path = image_path.with_name(image_path.name + ".gz")
        image_path.write_bytes(gzip.compress(raw))
    else:
        image_path.write_bytes(raw)
    with pytest.raises(DatasetError) as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    message = str(excinfo.value)
    assert str(image_path) in message
    assert "truncated" in message


def test_truncated_header_names_file(tmp_path, idx_arrays):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(idx_arrays[0])[:9])  # magic + part of the dimensions
    with pytest.raises(DatasetError, match="header truncated") as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


def test_gzip_stream_cut_short_names_file(tmp_path, write_idx, idx_arrays):
    images, labels = idx_arrays
    image_path, _ = _write_split(tmp_path, images, labels, write_idx, gz=True)
    blob = image_path.read_bytes()
    image_path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError) as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    assert str(image_path) in str(excinfo.value)
    assert "gzip" in str(excinfo.value)


@pytest.mark.parametrize("where", ["deflate-data", "crc"])
def test_gzip_stream_corrupted_names_file(tmp_path, where):
    """A damaged (not cut) gzip stream is a bad file too: it must come out
    as DatasetError naming the file, like every other fault (module
    docstring of detector/data.py).  Flipping a byte of the deflate block
    header makes zlib itself fail (zlib.error); flipping a byte of the
    stored CRC makes gzip fail (BadGzipFile)."""
    images = np.tile(np.arange(28, dtype=np.uint8), (7, 28, 1))  # compressible: Huffman-coded block
    blob = bytearray(gzip.compress(idx_bytes(images)))
    if where == "deflate-data":
        blob[12] ^= 0xFF
        with pytest.raises(zlib.error):  # the fault this case is about
            gzip.decompress(bytes(blob))
    else:
        blob[-6] ^= 0xFF
        with pytest.raises(gzip.BadGzipFile):
            gzip.decompress(bytes(blob))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetError) as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "magic",
    [b"\x00\x00\x0d\x03", b"\x01\x00\x08\x03", b"\x50\x4b\x03\x04"],
    ids=["float-dtype", "nonzero-lead", "zip-file"],
)
def test_wrong_magic_names_file(tmp_path, write_idx, idx_arrays, magic):
    images, labels = idx_arrays
    image_path, _ = _write_split(tmp_path, images, labels, write_idx, gz=False)
    raw = bytearray(image_path.read_bytes())
    raw[:4] = magic
    image_path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    assert str(image_path) in str(excinfo.value)
    assert "magic" in str(excinfo.value)


def test_wrong_ndim_names_file(tmp_path, write_idx, idx_arrays):
    images, labels = idx_arrays
    # labels written as a 2-D array: header says 2 dimensions, expected 1
    _, label_path = _write_split(tmp_path, images, labels.reshape(7, 1), write_idx, gz=False)
    with pytest.raises(DatasetError, match="expected 1 dimensions") as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    assert str(label_path) in str(excinfo.value)


def test_label_count_differs_names_files(tmp_path, write_idx, idx_arrays):
    images, labels = idx_arrays
    image_path, label_path = _write_split(tmp_path, images, labels[:5], write_idx, gz=True)
    with pytest.raises(DatasetError) as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    message = str(excinfo.value)
    assert str(image_path) in message and str(label_path) in message
    assert "7 images" in message and "5 labels" in message


def test_label_out_of_range_names_file(tmp_path, write_idx, idx_arrays):
    images, labels = idx_arrays
    labels = labels.copy()
    labels[3] = 10  # ten classes: 0..9
    _, label_path = _write_split(tmp_path, images, labels, write_idx, gz=False)
    with pytest.raises(DatasetError) as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    assert str(label_path) in str(excinfo.value)
    assert "out of range" in str(excinfo.value)


def test_missing_idx_file_names_it(tmp_path, write_idx, idx_arrays):
    images, _ = idx_arrays
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    with pytest.raises(DatasetError) as excinfo:
        load_idx_split(tmp_path, "train", FASHION_MNIST_CLASSES)
    assert str(tmp_path / "train-labels-idx1-ubyte") in str(excinfo.value)
    assert "not found" in str(excinfo.value)
    missing = tmp_path / "nothing-here.gz"
    with pytest.raises(DatasetError) as excinfo:
        read_idx(missing)
    assert str(missing) in str(excinfo.value)


def test_bad_split_name_rejected(tmp_path):
    with pytest.raises(ValueError):
        load_idx_split(tmp_path, "validation", FASHION_MNIST_CLASSES)
    with pytest.raises(ValueError):
        load_dataset("imagenet", "train")


# ----------------------------------------------------------------- real


def test_real_fashion_mnist_test_split(fmnist_test):
    data = fmnist_test
    assert len(data) == 10000
    assert data.images.shape == (10000, 1, 28, 28)
    assert data.shape == (1, 28, 28)
    assert data.images.dtype == torch.float32
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert float(data.images.max()) == 1.0  # 255 occurs somewhere
    assert data.labels.dtype == torch.int64
    assert sorted(data.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    assert data.classes == FASHION_MNIST_CLASSES
    # The published test set starts with an ankle boot, then a pullover.
    assert data.labels[:2].tolist() == [9, 2]


def test_pinned_fashion_mnist_digests_match_debian_files():
    for filename, pin in DOWNLOADS["fashion-mnist"]["files"].items():
        algorithm, _, expected = pin.rpartition(":")
        assert algorithm == "sha256-content"
        path = FASHION_MNIST_DIR / filename
        assert path.is_file(), f"{path} missing (dataset-fashion-mnist not installed?)"
        assert file_digest(path, algorithm) == expected, filename
        # and sha256-content really is the digest of the decompressed bytes
        assert expected == hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


# -------------------------------------------------------------- CIFAR-10


def test_cifar10_binary_batches_load(cifar_dir):
    root, (train_labels, train_images), (test_labels, test_images) = cifar_dir
    train = load_cifar10(root, "train")
    assert train.images.shape == (15, 3, 32, 32)
    assert train.images.dtype == torch.float32
    assert train.labels.tolist() == train_labels.tolist()
    assert torch.equal(train.images, torch.from_numpy(train_images.astype(np.float32) / 255.0))
    assert train.classes == CIFAR10_CLASSES
    test = load_dataset("cifar10", "test", root)
    assert test.images.shape == (2, 3, 32, 32)
    assert test.labels.tolist() == [4, 9]
    assert torch.equal(test.images, torch.from_numpy(test_images.astype(np.float32) / 255.0))


def test_cifar10_record_layout_channel_planes(tmp_path):
    """Byte 1 + c*1024 + y*32 + x of a record is pixel (c, y, x)."""
    record = bytearray(3073)
    record[0] = 7
    record[1 + 0 * 1024 + 0 * 32 + 5] = 10    # red, y=0, x=5
    record[1 + 1 * 1024 + 3 * 32 + 0] = 20    # green, y=3, x=0
    record[1 + 2 * 1024 + 31 * 32 + 31] = 255  # blue, y=31, x=31
    path = tmp_path / "one.bin"
    path.write_bytes(bytes(record))
    images, labels = read_cifar_batch(path)
    assert labels.tolist() == [7]
    assert images.shape == (1, 3, 32, 32)
    assert images[0, 0, 0, 5] == 10 and images[0, 1, 3, 0] == 20 and images[0, 2, 31, 31] == 255
    assert int(images.sum()) == 10 + 20 + 255


def test_cifar10_batches_bin_subdirectory(tmp_path, cifar_dir):
    root, _, _ = cifar_dir
    parent = tmp_path / "dist"
    parent.mkdir()
    shutil.move(str(root), str(parent / "cifar-10-batches-bin"))
    assert len(load_cifar10(parent, "test")) == 2


def test_cifar10_truncated_batch_names_file(cifar_dir):
    root = cifar_dir[0]
    batch = root / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DatasetError) as excinfo:
        load_cifar10(root, "train")
    assert str(batch) in str(excinfo.value)
    assert "truncated" in str(excinfo.value)


def test_cifar10_missing_and_bad_label_name_file(cifar_dir):
    root = cifar_dir[0]
    (root / "data_batch_5.bin").unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_cifar10(root, "train")
    assert str(root / "data_batch_5.bin") in str(excinfo.value)
    bad = root / "test_batch.bin"
    bad.write_bytes(cifar_records(np.array([11]), np.zeros((1, 3, 32, 32), np.uint8)))
    with pytest.raises(DatasetError) as excinfo:
        load_cifar10(root, "test")
    assert str(bad) in str(excinfo.value)


# ---------------------------------------------------------- image folder


def _png_folder(root, size_for=lambda cls, i: (5, 4), rgb=False):
    """Two class folders 'boot' and 'cat' (sorted order), 3 + 2 PNGs."""
    rng = np.random.default_rng(7)
    written = {}
    for cls, count in (("cat", 2), ("boot", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            w, h = size_for(cls, i)
            shape = (h, w, 3) if rgb else (h, w)
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = root / cls / f"img{i}.png"
            Image.fromarray(array, mode="RGB" if rgb else "L").save(path)
            written[path] = array
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return written


def test_image_folder_grey(tmp_path):
    written = _png_folder(tmp_path)
    data = load_image_folder(tmp_path, channels=1)
    assert data.classes == ("boot", "cat")
    assert data.images.shape == (5, 1, 4, 5)  # (N, C, H, W) for 5 wide, 4 high
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    order = sorted(written, key=lambda p: (p.parent.name, p.name))
    for k, path in enumerate(order):
        expected = torch.from_numpy(written[path].astype(np.float32) / 255.0)
        assert torch.equal(data.images[k, 0], expected)
    # load_dataset splits a single class-folder root into disjoint train and
    # test parts (it used to ignore the split and return the whole folder
    # for both: test images leaked into training).
    train = load_dataset("folder", "train", tmp_path, channels=1)
    test = load_dataset("folder", "test", tmp_path, channels=1)
    assert len(train) + len(test) == len(data) and len(test) >= 1
    together = torch.cat([train.images, test.images]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, data.images.flatten(1).tolist()))
    with pytest.raises(ValueError, match="split"):
        load_dataset("folder", "ignored", tmp_path, channels=1)


def test_image_folder_rgb(tmp_path):
    written = _png_folder(tmp_path, rgb=True)
    data = load_image_folder(tmp_path, channels=3)
    assert data.images.shape == (5, 3, 4, 5)
    order = sorted(written, key=lambda p: (p.parent.name, p.name))
    for k, path in enumerate(order):
        expected = torch.from_numpy(written[path].astype(np.float32) / 255.0).permute(2, 0, 1)
        assert torch.equal(data.images[k], expected)
    # RGB files read as grey: Pillow's own L conversion
    grey = load_image_folder(tmp_path, channels=1)
    assert grey.images.shape == (5, 1, 4, 5)
    first = order[0]
    expected = np.asarray(Image.open(first).convert("L"), dtype=np.float32) / 255.0
    assert torch.equal(grey.images[0, 0], torch.from_numpy(expected))


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_image_folder_corrupt_image_names_file(tmp_path, content):
    written = _png_folder(tmp_path)
    victim = sorted(written)[1]
    if content == "garbage":
        victim.write_bytes(b"this is not a png at all")
    else:
        victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DatasetError) as excinfo:
        load_image_folder(tmp_path)
    assert str(victim) in str(excinfo.value)


def test_image_folder_sizes_must_match_unless_resized(tmp_path):
    _png_folder(tmp_path, size_for=lambda cls, i: (6, 6) if (cls, i) == ("cat", 1) else (5, 4))
    with pytest.raises(DatasetError, match="image size") as excinfo:
        load_image_folder(tmp_path)
    assert str(tmp_path / "cat" / "img1.png") in str(excinfo.value)
    assert "--image-size" in str(excinfo.value)
    data = load_image_folder(tmp_path, size=8)
    assert data.images.shape == (5, 1, 8, 8)
    assert any(note.startswith("resized 5 image(s) to 8x8 (pad") for note in data.notes)
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0


def test_image_folder_empty_or_missing(tmp_path):
    with pytest.raises(DatasetError):
        load_image_folder(tmp_path / "absent")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path)


# ------------------------------------------------------- train/val split


def test_train_val_split_properties():
    train_a, val_a = train_val_split(1000, 0.1, seed=3)
    train_b, val_b = train_val_split(1000, 0.1, seed=3)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert len(val_a) == 100 and len(train_a) == 900
    assert set(train_a.tolist()).isdisjoint(val_a.tolist())
    assert sorted(train_a.tolist() + val_a.tolist()) == list(range(1000))
    train_c, val_c = train_val_split(1000, 0.1, seed=4)
    assert not torch.equal(val_a, val_c)
    assert set(val_a.tolist()) != set(val_c.tolist())
    assert sorted(train_c.tolist() + val_c.tolist()) == list(range(1000))


def test_train_val_split_reproduces_recorded_split():
    """The shipped bundle records (seed 0, fraction 0.1) over the 60000
    Fashion-MNIST training images; the same call must give the same split."""
    train, val = train_val_split(60000, 0.1, seed=0)
    assert val[:5].tolist() == [36044, 10678, 57327, 55074, 21567]
    digest = hashlib.sha256(train.numpy().tobytes() + val.numpy().tobytes()).hexdigest()
    assert digest == "cd76ed4cf5ffc72b2f5afdeb87cd4d4b4ea8651c72964caefb21406700256780"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_train_val_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        train_val_split(10, fraction, seed=0)


# -------------------------------------------------------------- download


def test_download_file_pins_succeed_byte_identical(tmp_path, http_root, http_server, idx_arrays):
    plain = idx_bytes(idx_arrays[0])
    gz = gzip.compress(plain)
    (http_root / "a.bin").write_bytes(plain)
    (http_root / "b-idx3-ubyte.gz").write_bytes(gz)
    dest = tmp_path / "dl"

    sha = hashlib.sha256(plain).hexdigest()
    out = download_file(http_server + "a.bin", dest / "a.bin", f"sha256:{sha}")
    assert out == dest / "a.bin" and out.read_bytes() == plain

    content = hashlib.sha256(plain).hexdigest()  # digest of the *decompressed* bytes
    assert content != hashlib.sha256(gz).hexdigest()
    out = download_file(http_server + "b-idx3-ubyte.gz", dest / "b.gz", f"sha256-content:{content}")
    assert out.read_bytes() == gz

    md5 = hashlib.md5(gz).hexdigest()
    out = download_file(http_server + "b-idx3-ubyte.gz", dest / "c.gz", f"md5:{md5}")
    assert out.read_bytes() == gz

    out = download_file(http_server + "a.bin", dest / "bare.bin", sha)  # bare hex = sha256
    assert out.read_bytes() == plain
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin", "b.gz", "bare.bin", "c.gz"]


@pytest.mark.parametrize("algorithm", ["sha256", "sha256-content", "md5"])
def test_download_file_wrong_digest_leaves_nothing(tmp_path, http_root, http_server, idx_arrays, algorithm):
    payload = gzip.compress(idx_bytes(idx_arrays[0]))
    (http_root / "f.gz").write_bytes(payload)
    dest = tmp_path / "dl"
    wrong = ("0" * 32) if algorithm == "md5" else ("0" * 64)
    with pytest.raises(DatasetError, match="mismatch") as excinfo:
        download_file(http_server + "f.gz", dest / "f.gz", f"{algorithm}:{wrong}")
    assert "f.gz" in str(excinfo.value)
    assert not (dest / "f.gz").exists()
    assert list(dest.iterdir()) == []  # no .part leftovers


def test_download_file_corrupt_gzip_rejected(tmp_path, http_root, http_server, idx_arrays):
    """A content pin on a download whose gzip stream is cut short."""
    payload = gzip.compress(idx_bytes(idx_arrays[0]))
    (http_root / "cut.gz").write_bytes(payload[: len(payload) // 2])
    dest = tmp_path / "dl"
    content = hashlib.sha256(idx_bytes(idx_arrays[0])).hexdigest()
    with pytest.raises(DatasetError, match="rejected"):
        download_file(http_server + "cut.gz", dest / "cut.gz", f"sha256-content:{content}")
    assert list(dest.iterdir()) == []


def test_download_file_keeps_verified_existing_file(tmp_path, http_server):
    """A file already present with the right digest is kept; the server is
    not asked (it would answer 404 here)."""
    dest = tmp_path / "present.bin"
    dest.write_bytes(b"already here")
    pin = "sha256:" + hashlib.sha256(b"already here").hexdigest()
    assert download_file(http_server + "missing-on-server.bin", dest, pin) == dest
    assert dest.read_bytes() == b"already here"


def test_download_file_replaces_stale_file(tmp_path, http_root, http_server):
    (http_root / "x.bin").write_bytes(b"fresh bytes")
    dest = tmp_path / "x.bin"
    dest.write_bytes(b"stale")
    pin = "sha256:" + hashlib.sha256(b"fresh bytes").hexdigest()
    download_file(http_server + "x.bin", dest, pin)
    assert dest.read_bytes() == b"fresh bytes"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_download_dataset_rejects_fake_fashion_mnist(tmp_path, http_root, http_server, write_idx, idx_arrays):
    """Well-formed IDX files that are not the published ones must fail the pins."""
    images, labels = idx_arrays
    for split in ("train", "test"):
        _write_split(http_root, images, labels, write_idx, gz=True, split=split)
    assert sorted(p.name for p in http_root.iterdir()) == sorted(DOWNLOADS["fashion-mnist"]["files"])
    root = tmp_path / "fmnist"
    with pytest.raises(DatasetError, match="mismatch"):
        download_dataset("fashion-mnist", root, base_url=http_server)
    leftovers = list(root.iterdir()) if root.exists() else []
    assert leftovers == []


def test_download_dataset_accepts_real_fashion_mnist(tmp_path, serve_directory):
    """Debian's copy of the real files, served over HTTP, passes every pin."""
    base = serve_directory(FASHION_MNIST_DIR)
    root = tmp_path / "fmnist"
    assert download_dataset("fashion-mnist", root, base_url=base) == root
    for filename in DOWNLOADS["fashion-mnist"]["files"]:
        assert (root / filename).read_bytes() == (FASHION_MNIST_DIR / filename).read_bytes()
    assert sorted(p.name for p in root.iterdir()) == sorted(DOWNLOADS["fashion-mnist"]["files"])


def test_download_dataset_unknown_name(tmp_path):
    with pytest.raises(ValueError):
        download_dataset("imagenet", tmp_path)


def test_file_digest_algorithms(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"hello"))
    assert file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_digest(path, "sha256-content") == hashlib.sha256(b"hello").hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError):
        file_digest(path, "crc32")


# ------------------------------------------------ data spec and load_split


def _save(path: Path, array: np.ndarray, mode: str | None = None, **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    image.save(path, **save_options)
    return path


def _class_tree(root: Path, counts: dict[str, int], size=lambda cls, i: (6, 6), rgb=lambda cls, i: False, seed=0):
    """root/<class>/<class>-<i>.png; returns {path: uint8 array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, count in counts.items():
        for i in range(count):
            width, height = size(cls, i)
            shape = (height, width, 3) if rgb(cls, i) else (height, width)
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
            written[_save(root / cls / f"{cls}-{i}.png", array)] = array
    return written


def _train_test_tree(root: Path):
    """train/ with mixed sizes and two RGB images; test/ smaller."""
    train = _class_tree(root / "train", {"ant": 4, "bee": 3, "cow": 5},
                        size=lambda c, i: (8, 6) if i == 1 else (6, 6), rgb=lambda c, i: c == "bee" and i < 2)
    test = _class_tree(root / "test", {"ant": 2, "bee": 1, "cow": 2}, seed=1)
    return train, test


def test_data_spec_json_round_trip():
    spec = DataSpec("folder", "/data/x", image_size=32, channels=3, resize="crop", test_fraction=0.25,
                    split_seed=7, layout="single", classes=("a", "b"), shape=(3, 32, 32), fingerprint="ab")
    blob = json.dumps(spec.to_json())
    assert DataSpec.from_json(json.loads(blob)) == spec
    assert DataSpec.from_json(blob) == spec
    assert json.loads(blob)["classes"] == ["a", "b"]
    assert DataSpec.from_json(DataSpec().to_json()) == DataSpec()
    with pytest.raises(ValueError, match="unknown field"):
        DataSpec.from_json({**spec.to_json(), "colour": True})


@pytest.mark.parametrize("bad", [
    {"dataset": "imagenet"}, {"channels": 2}, {"resize": "squash"}, {"image_size": 0}, {"image_size": 2.5},
    {"test_fraction": 1.0}, {"layout": "nested"}, {"dataset": "folder"},
])
def test_data_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DataSpec(**bad)


def test_folder_train_test_layout_loads_with_notes(tmp_path):
    """root/train + root/test: refused before; now mixed sizes, RGB kept,
    channels inferred, and each conversion said."""
    train_files, test_files = _train_test_tree(tmp_path)
    spec = DataSpec("folder", str(tmp_path), image_size=6)
    train = load_split(spec, "train")
    assert train.classes == ("ant", "bee", "cow")
    assert train.images.shape == (12, 3, 6, 6)
    assert train.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    notes = " | ".join(train.notes)
    assert "inferred channels=3: 2 of 12 training images are stored in colour" in notes
    assert "resized 3 image(s) to 6x6 (pad" in notes
    assert "repeated the grey channel of 10 image(s)" in notes
    assert train.spec.layout == "train-test" and train.spec.channels == 3 and train.spec.shape == (3, 6, 6)
    rgb_path = tmp_path / "train" / "bee" / "bee-0.png"
    assert torch.equal(train.images[4], torch.from_numpy(train_files[rgb_path] / np.float32(255)).permute(2, 0, 1))
    test = load_split(spec, "test")
    assert test.images.shape == (5, 3, 6, 6) and test.labels.tolist() == [0, 0, 1, 2, 2]
    assert load_dataset("folder", "test", tmp_path, size=6).labels.tolist() == [0, 0, 1, 2, 2]


def test_folder_grey_on_request_says_so(tmp_path):
    _train_test_tree(tmp_path)
    train = load_split(DataSpec("folder", tmp_path, image_size=6, channels=1), "train")
    assert train.images.shape == (12, 1, 6, 6)
    assert any(n.startswith("converted 2 colour image(s) to grey") and "bee/bee-0.png" in n for n in train.notes)


def test_folder_inferred_grey_when_no_colour(tmp_path):
    _class_tree(tmp_path, {"a": 3, "b": 3})
    data = load_split(DataSpec("folder", tmp_path), "train")
    assert data.shape == (1, 6, 6)
    assert "inferred channels=1: all 5 training images are grey" in data.notes  # 1 of 6 held out


def test_folder_test_folder_classes_checked(tmp_path):
    _train_test_tree(tmp_path)
    _class_tree(tmp_path / "test", {"dog": 1})
    with pytest.raises(DatasetError) as excinfo:
        load_split(DataSpec("folder", tmp_path, image_size=6), "test")
    assert str(tmp_path / "test" / "dog") in str(excinfo.value) and "not one of the training classes" in str(excinfo.value)
    shutil.rmtree(tmp_path / "test" / "dog")
    shutil.rmtree(tmp_path / "test" / "bee")
    test = load_split(DataSpec("folder", tmp_path, image_size=6), "test")
    assert test.classes == ("ant", "bee", "cow") and test.labels.tolist() == [0, 0, 2, 2]
    assert any("no images of class(es) ['bee']" in note for note in test.notes)


def test_folder_half_layout_refused(tmp_path):
    _class_tree(tmp_path, {"train": 2, "zebra": 2})  # a class called 'train', or a test/ forgotten?
    with pytest.raises(DatasetError, match="has train/ but no test/") as excinfo:
        load_split(DataSpec("folder", tmp_path), "train")
    assert str(tmp_path) in str(excinfo.value)
    assert load_split(DataSpec("folder", tmp_path, layout="single"), "train").classes == ("train", "zebra")


def test_single_folder_held_out_test_split(tmp_path):
    _class_tree(tmp_path, {"a": 20, "b": 10, "c": 5})
    spec = DataSpec("folder", tmp_path, test_fraction=0.2, split_seed=3)
    train, test = load_split(spec, "train"), load_split(spec, "test")
    assert len(test) == 7 and len(train) == 28
    assert class_counts(test.labels) == {0: 4, 1: 2, 2: 1}  # 20 % of each class
    train_rows = {tuple(r) for r in train.images.flatten(1).tolist()}
    test_rows = {tuple(r) for r in test.images.flatten(1).tolist()}
    assert train_rows.isdisjoint(test_rows) and len(train_rows | test_rows) == 35
    assert any("held out with seed 3" in note for note in test.notes)
    again = load_split(DataSpec.from_json(test.spec.to_json()), "test")
    assert torch.equal(again.images, test.images)
    other = load_split(DataSpec("folder", tmp_path, test_fraction=0.2, split_seed=4), "test")
    assert not torch.equal(other.images, test.images)


def test_recorded_spec_refuses_changed_folder(tmp_path):
    _class_tree(tmp_path, {"a": 5, "b": 5})
    recorded = resolve_spec(DataSpec("folder", tmp_path))
    assert recorded.fingerprint and recorded.classes == ("a", "b") and recorded.shape == (1, 6, 6)
    assert len(load_split(recorded, "train")) == 8
    _save(tmp_path / "a" / "new.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(DatasetError, match="leak"):
        load_split(recorded, "test")
    (tmp_path / "a" / "new.png").unlink()
    shutil.move(str(tmp_path / "b"), str(tmp_path / "c"))
    with pytest.raises(DatasetError, match="classes"):
        load_split(replace(recorded, fingerprint=None), "train")


def test_recorded_shape_resizes_test_images_of_another_size(tmp_path):
    _class_tree(tmp_path / "train", {"a": 2, "b": 2}, size=lambda c, i: (7, 5))  # 7 wide, 5 high
    _class_tree(tmp_path / "test", {"a": 1, "b": 1}, size=lambda c, i: (14, 10))
    spec = resolve_spec(DataSpec("folder", tmp_path, resize="stretch"))
    assert spec.shape == (1, 5, 7)  # non-square kept as it is
    test = load_split(spec, "test")
    assert test.shape == (1, 5, 7) and any(note.startswith("resized 2 image(s) to 7x5") for note in test.notes)
    with pytest.raises(DatasetError) as excinfo:
        load_split(replace(spec, resize="none"), "test")
    assert str(tmp_path / "test" / "a" / "a-0.png") in str(excinfo.value) and "resize='none'" in str(excinfo.value)


def test_fit_size_pad_centres_and_fills_with_border_mean():
    array = np.arange(8, dtype=np.float32).reshape(4, 2, 1) / 10  # 2 wide, 4 high
    out = fit_size(array, (4, 4), "pad")
    assert out.shape == (4, 4, 1)
    assert np.array_equal(out[:, 1:3], array)  # scale 1: copied, centred
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]]).mean()
    assert np.allclose(out[:, 0], border) and np.allclose(out[:, 3], border)
    black = np.zeros((3, 9, 1), np.float32)
    black[1, 3:6] = 1.0  # a bright mark on a black background
    padded = fit_size(black, (6, 6), "pad")  # scale 2/3: 6 wide, 2 high, rows 2..3
    assert padded.shape == (6, 6, 1) and float(padded[0].max()) == 0.0 and float(padded[5].max()) == 0.0
    assert float(padded[2:4].max()) > 0.0


def test_fit_size_crop_stretch_none():
    array = np.arange(24, dtype=np.float32).reshape(4, 6, 1) / 24  # 6 wide, 4 high
    assert np.array_equal(fit_size(array, (4, 4), "crop"), array[:, 1:5])  # centre square
    stretched = fit_size(array, (4, 4), "stretch")
    assert stretched.shape == (4, 4, 1) and 0.0 <= stretched.min() and stretched.max() <= 1.0
    assert fit_size(array, (4, 6), "none") is array
    with pytest.raises(DatasetError, match="x.png: 6x4 pixels, expected 4x4"):
        fit_size(array, (4, 4), "none", where="x.png")
    tall = fit_size(np.ones((9, 3, 1), np.float32), (5, 5), "crop")
    assert tall.shape == (5, 5, 1) and np.allclose(tall, 1.0)


def test_folder_rgb_crop_keeps_colour(tmp_path):
    red = np.zeros((4, 8, 3), np.uint8)
    red[..., 0] = 255
    _save(tmp_path / "r" / "wide.png", red)
    _save(tmp_path / "g" / "tall.jpg", np.full((8, 4, 3), (0, 200, 0), np.uint8), quality=95)
    data = load_image_folder(tmp_path, channels=None, size=4, resize="crop")
    assert data.shape == (3, 4, 4)
    assert torch.allclose(data.images[1, 0], torch.ones(4, 4)) and float(data.images[1, 1:].max()) == 0.0
    assert float(data.images[0, 1].mean()) > 0.7 and float(data.images[0, 0].max()) < 0.1


# ----------------------------------------------------- odd and bad images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("fault", ["garbage", "truncated-png", "truncated-jpeg", "zero-size", "empty-file"])
def test_bad_image_files_name_the_file(tmp_path, fault):
    _class_tree(tmp_path, {"a": 2, "b": 2})
    victim = tmp_path / "b" / ("bad.jpg" if "jpeg" in fault else "bad.png")
    if fault == "garbage":
        victim.write_bytes(b"GIF89a but not really")
    elif fault == "truncated-png":
        victim.write_bytes((tmp_path / "a" / "a-0.png").read_bytes()[:60])
    elif fault == "truncated-jpeg":
        _save(tmp_path / "full.jpg", np.random.default_rng(0).integers(0, 256, (6, 6), dtype=np.uint8))
        victim.write_bytes((tmp_path / "full.jpg").read_bytes()[:-40])
    elif fault == "zero-size":
        header = struct.pack(">IIBBBBB", 0, 6, 8, 0, 0, 0, 0)
        victim.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    else:
        victim.write_bytes(b"")
    for load in (lambda: load_image_folder(tmp_path, channels=1), lambda: load_split(DataSpec("folder", tmp_path), "test")):
        with pytest.raises(DatasetError) as excinfo:
            load()
        assert str(victim) in str(excinfo.value)


def test_deep_and_float_images(tmp_path):
    deep = (np.arange(36, dtype=np.uint16) * 1800).reshape(6, 6)
    _save(tmp_path / "a" / "deep.png", deep)
    _save(tmp_path / "b" / "plain.png", np.full((6, 6), 51, np.uint8))
    data = load_image_folder(tmp_path, channels=1)
    assert torch.allclose(data.images[0, 0], torch.from_numpy(deep / np.float32(65535)))
    assert any(n.startswith("scaled 1 16-bit image(s) to [0, 1]") and "a/deep.png" in n for n in data.notes)
    floaty = _save(tmp_path / "b" / "float.tif", np.zeros((6, 6), np.float32))
    with pytest.raises(DatasetError, match="floating-point") as excinfo:
        load_image_folder(tmp_path)
    assert str(floaty) in str(excinfo.value)
    floaty.unlink()
    wide = _save(tmp_path / "b" / "wide.tif", np.full((6, 6), 70000, np.int32))
    with pytest.raises(DatasetError, match="do not fit 16 bits") as excinfo:
        load_image_folder(tmp_path)
    assert str(wide) in str(excinfo.value)


def test_animated_alpha_palette_cmyk_are_converted_and_noted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    frames = [Image.fromarray(np.full((6, 6), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "a" / "anim.gif", save_all=True, append_images=frames[1:])
    la = np.stack([np.full((6, 6), 200, np.uint8), np.tile(np.array([0, 255, 128, 255, 0, 255], np.uint8), (6, 1))], -1)
    _save(tmp_path / "a" / "la.png", la, mode="LA")
    palette = Image.fromarray(np.tile(np.array([0, 1, 2, 1, 0, 2], np.uint8), (6, 1)), mode="P")
    palette.putpalette([255, 255, 255, 255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "b" / "pal.png", transparency=0)
    _save(tmp_path / "b" / "cmyk.jpg", np.zeros((6, 6, 4), np.uint8), mode="CMYK")
    data = load_image_folder(tmp_path, channels=None)
    assert data.shape == (3, 6, 6)  # the palette is coloured: 3 channels inferred
    notes = " | ".join(data.notes)
    assert "took the first frame of 1 animated image(s) (a/anim.gif)" in notes
    assert "composited 2 image(s) with transparency onto black (a/la.png, b/pal.png)" in notes
    assert "converted 1 image(s) from mode CMYK to RGB (b/cmyk.jpg)" in notes
    anim, la_image, cmyk, pal = data.images  # sorted: a/anim.gif, a/la.png, b/cmyk.jpg, b/pal.png
    assert torch.allclose(anim, torch.full((3, 6, 6), 10 / 255))
    assert torch.equal(la_image[:, 0, 0], torch.zeros(3))  # alpha 0 on black
    assert torch.allclose(la_image[:, 0, 1], torch.full((3,), 200 / 255))  # opaque
    assert torch.equal(pal[:, 0, 0], torch.zeros(3))  # transparent palette entry -> black
    assert torch.equal(pal[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert float(cmyk.min()) > 0.9  # CMYK 0 ink is white


def test_hidden_and_non_image_entries(tmp_path):
    _class_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "a" / "readme.txt").write_text("x")
    data = load_image_folder(tmp_path)
    assert data.classes == ("a", "b") and len(data) == 4
    assert any("ignored 1 entries that are not image files (a/readme.txt)" in note for note in data.notes)


def test_load_image_folder_refuses_train_test_root(tmp_path):
    _train_test_tree(tmp_path)
    with pytest.raises(DatasetError, match="load_split"):
        load_image_folder(tmp_path)


# -------------------------------------------- fixed datasets, statistics


def test_fixed_dataset_channels_and_size_conversions(fmnist_test):
    spec = DataSpec("fashion-mnist", channels=3, image_size=32)
    data = load_split(spec, "test")
    assert data.shape == (3, 32, 32) and len(data) == 10000
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    assert any("repeated the grey channel of 10000 images" in n for n in data.notes)
    assert any("resized 10000 images from 28x28 to 32x32" in n for n in data.notes)
    assert data.spec.shape == (3, 32, 32) and data.spec.classes == FASHION_MNIST_CLASSES
    plain = load_split(DataSpec("fashion-mnist"), "test")
    assert plain.notes == [] and torch.equal(plain.images, fmnist_test.images)
    with pytest.raises(DatasetError, match="resize='none'"):
        load_split(DataSpec("fashion-mnist", image_size=32, resize="none"), "test")
    with pytest.raises(DatasetError, match="recorded"):
        load_split(DataSpec("fashion-mnist", shape=(1, 32, 32)), "test")


def test_cifar_to_grey_uses_luma(cifar_dir):
    root = cifar_dir[0]
    colour = load_cifar10(root, "test").images
    grey = load_split(DataSpec("cifar10", str(root), channels=1), "test")
    expected = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    assert grey.shape == (1, 32, 32) and torch.allclose(grey.images[:, 0], expected, atol=1e-6)
    assert any("converted 2 colour images to grey" in n for n in grey.notes)


def test_normalisation_stats_float64_per_channel(fmnist_test):
    rng = np.random.default_rng(0)
    array = rng.random((9, 3, 5, 4)).astype(np.float32)
    mean, std = normalisation_stats(torch.from_numpy(array))
    flat = array.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    assert len(mean) == 3 and np.allclose(mean, flat.mean(1), atol=1e-12) and np.allclose(std, flat.std(1), atol=1e-12)
    real_mean, real_std = normalisation_stats(fmnist_test.subset(torch.arange(2000)))
    pixels = fmnist_test.images[:2000].double()
    assert abs(real_mean[0] - float(pixels.mean())) < 1e-12 and abs(real_std[0] - float(pixels.std(unbiased=False))) < 1e-9
    assert 0.25 < real_mean[0] < 0.32 and 0.32 < real_std[0] < 0.38  # Fashion-MNIST's known statistics
    with pytest.raises(DatasetError, match="std 0"):
        normalisation_stats(torch.zeros(2, 1, 3, 3))


def test_image_set_sample_is_stratified_and_seeded(fmnist_test):
    correct = fmnist_test.labels % 4 != 0  # stands in for "correctly classified"
    chosen = fmnist_test.sample(40, seed=0, mask=correct)
    assert len(chosen) == 40 and bool((chosen.labels % 4 != 0).all())
    counts = class_counts(chosen.labels)
    assert len(counts) == 7 and max(counts.values()) - min(counts.values()) <= 1
    assert torch.equal(fmnist_test.sample(40, seed=0, mask=correct).labels, chosen.labels)
