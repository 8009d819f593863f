"""Data loaders, checks and verified download (detector/data.py).

Every fixture is a real file: IDX bytes written with struct, CIFAR-10
binary records, PNGs written with Pillow, and a real HTTP server on
127.0.0.1 for the download paths.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import zlib
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
    DatasetError,
    download_dataset,
    download_file,
    file_digest,
    load_cifar10,
    load_dataset,
    load_idx_split,
    load_image_folder,
    read_cifar_batch,
    read_idx,
    train_val_split,
)

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
    same = load_dataset("folder", "ignored", tmp_path, channels=1)
    assert torch.equal(same.images, data.images)


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
    with pytest.raises(DatasetError, match="pass size=") as excinfo:
        load_image_folder(tmp_path)
    assert str(tmp_path / "cat" / "img1.png") in str(excinfo.value)
    data = load_image_folder(tmp_path, size=8)
    assert data.images.shape == (5, 1, 8, 8)
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
