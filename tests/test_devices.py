"""--device: names, the refusal of a missing GPU, and jobs that honour it;
how many cores a process may use (affinity and cgroup CPU quota)."""

from __future__ import annotations

import pytest
import torch

import os

from pathguard.detector.devices import DEVICES, cgroup_cpu_limit, exact_arithmetic, resolve_device, usable_cpus
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


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "200000 100000\n"}, 2.0),                       # cgroup v2, --cpus 2
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),                          # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),    # v1, no limit
    ({}, None),                                                    # no cgroup files at all
])
def test_cgroup_cpu_quota_is_read_from_v1_and_v2_files(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert usable_cpus(tmp_path) == 16                      # no quota: the mask
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == 2                       # 1.5 CPUs of time: 2 cores, rounded up
    (tmp_path / "cpu.max").write_text("20000 100000\n")
    assert usable_cpus(tmp_path) == 1                       # never below one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert usable_cpus(tmp_path) == 1                       # the mask still bounds it
