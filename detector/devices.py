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

import os

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


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has
    one), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
