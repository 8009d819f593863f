"""Writing and verifying artifacts: atomic files and a SHA-256 manifest.

Everything PathGuard writes goes through ``atomic_write_*`` (temporary file in
the same directory, fsync, rename), so an interrupted run leaves either the
old file or the new one, never a torn one that later loads.  No pickle:
tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, tampered with, truncated or does not fit."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared read-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(contiguous, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> dict:
    """Record the SHA-256 of every file in ``directory`` (but the manifest)."""
    directory = Path(directory)
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    manifest = {"algorithm": "sha256", "files": files}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def verify_manifest(directory: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Check every file the manifest lists; raise ArtifactError naming the
    first missing, truncated or altered file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: bundle directory not found")
    manifest = read_json(directory / MANIFEST)
    files = manifest.get("files")
    if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
        raise ArtifactError(f"{directory / MANIFEST}: not a sha256 manifest")
    for name in required:
        if name not in files:
            raise ArtifactError(f"{directory}: manifest does not list required file {name}")
    for name, expected in files.items():
        path = directory / name
        if Path(name).name != name:
            raise ArtifactError(f"{directory / MANIFEST}: entry {name!r} is not a plain file name")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: SHA-256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): tampered or truncated")
    return manifest


def manifest_digest(directory: str | os.PathLike) -> str:
    """One identifier for a whole bundle: the SHA-256 of its manifest."""
    return sha256_file(Path(directory) / MANIFEST)
