"""Where a job runs: ``auto``, ``cpu`` or ``cuda``.

Every job takes ``--device``; ``auto`` is the GPU when PyTorch sees one,
else the CPU.  On a GPU, TF32 arithmetic is switched off wherever results
are measured or stored: convolutions and matrix products then round like
the CPU's float32, so a bundle fitted on a GPU gives the same scores on a
CPU (to about 1e-6), and binary gates near zero do not flip between the
two.  Training alone may use TF32 (``exact=False``): its rounding is one
more source of noise in SGD, and it is several times faster.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

DEVICES = ("auto", "cpu", "cuda")


def exact_arithmetic(exact: bool = True) -> None:
    """Full float32 (exact=True) or TF32 (False) for CUDA matrix products and
    convolutions; no effect on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact


def resolve_device(name: str = "auto", exact: bool = True) -> torch.device:
    """The torch device for a ``--device`` value; ``cuda`` without a GPU is
    refused with the reason rather than failing later inside PyTorch."""
    if name not in DEVICES:
        raise ValueError(f"device: {name!r} is not one of {list(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda asked for, but PyTorch sees no GPU "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        exact_arithmetic(exact)
    return torch.device(name)


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs this process's cgroup may use per unit of time (its CPU quota,
    as in a container's ``--cpus`` or a Kubernetes CPU limit), or None when
    it has none.  Reads cgroup v2 ``cpu.max`` ("200000 100000" = 2 CPUs,
    "max 100000" = no limit) or cgroup v1 ``cpu/cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us`` (a quota of -1 = no limit)."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPU cores this process may run on: its affinity mask (where the OS has
    one), not the machine's count, and no more than its cgroup's CPU quota
    rounded up (a container limited to 2 CPUs on a 16-core node sees all 16
    in its affinity mask, but gets the time of 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores
