"""--device: names, the refusal of a missing GPU, and jobs that honour it."""

from __future__ import annotations

import pytest
import torch

from pathguard.detector.devices import DEVICES, exact_arithmetic, resolve_device
from pathguard.jobs import attack, evaluate, fit, measure, train
from pathguard.jobs.config import check


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_cuda_without_gpu_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")


def test_exact_arithmetic_switches_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        exact_arithmetic(False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        exact_arithmetic(True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("job", [train, fit, attack, evaluate, measure])
def test_jobs_take_a_checked_device_option(job):
    cfg = job.Config()
    assert cfg.device == "auto"
    cfg.device = "gpu"
    with pytest.raises(ValueError, match="device"):
        check(cfg)
    assert set(DEVICES) == {"auto", "cpu", "cuda"}
