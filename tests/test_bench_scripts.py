"""The service bench scripts run end to end on the small test bundle, with tiny bounds.

bench/bench_load.py, bench/bench_service.py and bench/bench_http.py (with wrk)
each start the real service in a subprocess on a free loopback port; here
they run as the user would run them (a subprocess of this interpreter), and
their JSON summaries are checked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"


@pytest.fixture(scope="session")
def bench_bundle(service_bundle) -> Path:
    return service_bundle


def run_script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_load_passes_with_tiny_bounds(bench_bundle, tmp_path):
    out = tmp_path / "load.json"
    proc = run_script("bench_load.py", "--bundle", str(bench_bundle), "--requests", "200", "--seconds", "30",
                      "--clients", "16", "--threads", "1", "--images", "64", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] is True and summary["failures"] == []
    assert summary["server_errors_5xx"] == 0
    assert summary["mismatches"] == 0
    assert summary["lost"] == 0
    assert summary["wrong_status"] == 0
    assert summary["requests"] == 200
    assert 0 < summary["valid_requests"] < 200 and summary["images_checked"] >= summary["valid_requests"]
    assert summary["rss_growth_mb"] <= summary["max_rss_growth_mb"]
    assert summary["still_ready"] is True
    assert summary["requests_per_s"] > 0 and summary["p99_ms"] >= summary["p50_ms"] > 0
    assert re.search(r"^  5xx:\s+0$", proc.stdout, re.M)
    assert re.search(r"^  mismatches:\s+0$", proc.stdout, re.M)
    assert proc.stdout.rstrip().splitlines()[-1] == "PASS"


def test_bench_load_exits_non_zero_when_an_invariant_fails(bench_bundle, tmp_path):
    out = tmp_path / "load.json"
    # An impossible RSS budget: the run itself is clean, the invariant is not met.
    proc = run_script("bench_load.py", "--bundle", str(bench_bundle), "--requests", "20", "--seconds", "20",
                      "--clients", "4", "--threads", "1", "--images", "16", "--warmup", "4",
                      "--max-rss-growth-mb", "-100000", "--json", str(out))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] is False
    assert any("RSS" in failure for failure in summary["failures"])
    assert summary["server_errors_5xx"] == 0 and summary["mismatches"] == 0
    assert "FAIL:" in proc.stdout and "server RSS grew" in proc.stdout


def test_bench_service_prints_a_ratio_per_setting(bench_bundle, tmp_path):
    out = tmp_path / "service.json"
    proc = run_script("bench_service.py", "--bundle", str(bench_bundle), "--clients", "1", "4", "--requests", "20",
                      "--seconds", "10", "--threads", "1", "--images", "64", "--ceiling-seconds", "0.5",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ceiling"]["images_per_s"] > 0
    settings = {(row["batching"], row["clients"]) for row in result["rows"]}
    assert settings == {("on", 1), ("on", 4), ("off", 1), ("off", 4)}
    for row in result["rows"]:
        assert row["errors"] == 0 and row["ok"] == row["requests"] == 20
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["ratio"] == pytest.approx(row["images_per_s"] / result["ceiling"]["images_per_s"])
        assert row["p99_ms"] >= row["p50_ms"] > 0
    # The printed table: one line per setting, ending in its ratio.
    table = re.findall(r"^\s+(on|off)\s+(\d+)\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+\.\d{3})\s",
                       proc.stdout, re.M)
    assert {(mode, int(clients)) for mode, clients, _ in table} == settings
    assert "ceiling" in proc.stdout and "torch" in proc.stdout


def test_bench_http_prints_each_figure_as_a_ratio(bench_bundle, tmp_path):
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed (apt-get install -y wrk): bench/bench_http.py needs it")
    out = tmp_path / "http.json"
    proc = run_script("bench_http.py", "--bundle", str(bench_bundle), "--duration", "1", "--warmup", "0",
                      "--connections", "4", "--batch-connections", "2", "--threads", "1", "--ceiling-threads", "1",
                      "--images", "64", "--ceiling-seconds", "0.3", "--set", "inference_workers=2",
                      "--compare", "inference_workers=1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["scenario"]: row for row in result["rows"]}
    assert set(rows) == {"health", "json-1", "octet-1", "json-32", "npy-32", "json-1-c1", "octet-1-c1"}
    ceiling = result["ceiling"]["images_per_s"]
    assert ceiling > 0
    for name, row in rows.items():
        assert row["errors"] == 0 and row["requests"] > 0, row
        assert row["p99_ms"] >= row["p50_ms"] > 0
        assert row["health_ratio"] == pytest.approx(row["requests_per_s"] / rows["health"]["requests_per_s"])
        if name == "health":
            assert row["ceiling_ratio"] is None
        else:
            assert row["images_per_s"] == pytest.approx(row["requests_per_s"] * row["images_per_request"])
            assert row["ceiling_ratio"] == pytest.approx(row["images_per_s"] / ceiling)
        # a batch scenario's own ceiling, measured just before and after it
        if name in ("json-32", "npy-32"):
            near = row["ceiling_adjacent"]
            assert near["images_per_s"] == pytest.approx((near["before"] + near["after"]) / 2) and near["after"] > 0
            assert row["ceiling_ratio_adjacent"] == pytest.approx(row["images_per_s"] / near["images_per_s"])
        else:
            assert "ceiling_adjacent" not in row
    assert rows["json-1-c1"]["connections"] == 1 and rows["json-32"]["connections"] == 2
    # Batch statistics from the server's /metrics: health runs no inference; a lone
    # client's requests are one image per inference call; with one worker a
    # 32-image request is one call (at least 32 images), with two free workers it
    # may be shared out between them in pieces of the forward chunk (8).
    compare = {row["scenario"]: row for row in result["compare"]["rows"]}
    assert result["compare"]["settings"]["inference_workers"] == "1"
    assert result["settings"]["server"]["inference_workers"] == "2"
    assert set(compare) == set(rows) and all(row["errors"] == 0 and row["requests"] > 0 for row in compare.values())
    for table, workers in ((rows, 2), (compare, 1)):
        assert table["health"]["batches"]["calls"] == 0
        assert table["json-1-c1"]["batches"]["images_per_call"] == pytest.approx(1.0)
        assert table["npy-32"]["batches"]["images_per_call"] >= (32 if workers == 1 else 8)
        assert all(0 < table[n]["batches"]["ms_per_call"] and 0 < table[n]["batches"]["worker_busy"] <= 1.05 * workers
                   for n in table if n != "health")
        assert all(table[n]["batches"]["gc_collections"] >= table[n]["batches"]["gc_stalls"] >= 0 for n in table)
    assert sum(rows[n]["batches"]["gc_collections"] for n in rows) > 0  # the server's collections are counted
    # and the comparison: per scenario, the second server's figures as ratios to the first's
    assert "(compare / first)" in proc.stdout
    assert re.search(r"^npy-32\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d$", proc.stdout, re.M)
    assert {t["target"].split(":")[0] for t in result["targets"]} >= {"json-1", "octet-1", "json-32", "npy-32",
                                                                     "json-1-c1", "octet-1-c1"}
    # The printed table: one line per scenario, with its ratio to /health and to the ceiling.
    table = re.findall(r"^(\S+)\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+)\s+(\d+\.\d{3})\s+"
                       r"(\d+\.\d{3}|-)\s", proc.stdout, re.M)
    assert {name for name, *_ in table} == set(rows)
    assert all(errors == "0" for _, _, _, errors, _, _ in table)
    assert "ceiling" in proc.stdout and "targets:" in proc.stdout
    assert re.search(r"^  (met   |MISSED) json-32: images/s >= 70% of the in-process ceiling: \d+\.\d{3} "
                     r"\(against the ceiling measured around it: \d+\.\d{3}\)$", proc.stdout, re.M)
    batch_targets = [t for t in result["targets"] if t["target"].startswith(("json-32", "npy-32"))]
    assert len(batch_targets) == 2
    assert all(t["met"] == (t["value"] >= 0.70) and t["value_adjacent_ceiling"] > 0 for t in batch_targets)


def test_bench_forward_compares_the_pools_and_checks_their_bits(tmp_path):
    out = tmp_path / "forward.json"
    proc = run_script("bench_forward.py", "--batches", "1", "8", "--repeats", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["rows"]] == [1, 8]
    for row in result["rows"]:
        assert row["logits_equal"] and row["scores_equal"]
        for job in ("forward", "inspect"):
            r = row[job]
            assert r["speedup"] == pytest.approx(r["max_pool2d_ms_per_image"] / r["fast_ms_per_image"])
    assert len(re.findall(r"^\s+\d+\s+(forward|inspect)\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+True$", proc.stdout, re.M)) == 4


def test_bench_attack_workers_prints_a_ratio_per_attack(tmp_path):
    out = tmp_path / "attack-workers.json"
    proc = run_script("bench_attack_workers.py", "--attacks", "fgsm", "--n", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["attack"] == "fgsm" and row["images"] == 16
    assert row["speedup"] == pytest.approx(row["one_process_s"] / row["workers_s"])
    assert row["bit_identical"] is True   # FGSM: one gradient sign, the same at any thread count
    assert row["images_differing"] == 0 and row["max_abs_difference"] == 0.0
    assert re.search(r"^fgsm\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+True\s+\(0, 0\)$", proc.stdout, re.M)


def test_batch_invariance_check_tells_invariant_ops_from_batch_dependent_ones(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import batch_invariance_check as check
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    import torch

    x = torch.randn(64, 5)
    assert check.agreement(torch.relu, x) == "Y" * check.MAX_PASS           # row by row: any pass size
    assert check.agreement(lambda t: t - t.mean(dim=0), x) == "." * check.MAX_PASS  # depends on the others
    out = tmp_path / "invariance.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "batch_invariance_check.py"), "--json",
                           str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [row["op"] for row in result["rows"]]
    from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle

    gated = len(load_bundle(DEFAULT_BUNDLE).decoupled.gated_widths)  # 6 on vgg7
    # the ungated first conv, each gated conv with its ACM's two linears, the head
    assert names[0] == "block0.conv" and names[-1] == "head" and len(names) == 1 + 3 * gated + 1
    assert all(len(row["identical"]) == check.MAX_PASS for row in result["rows"])
    assert result["agreeing_pass_sizes"] == [n for n in range(1, check.MAX_PASS + 1)
                                             if all(row["identical"][n - 1] for row in result["rows"])]


def test_bench_bundles_times_two_bundles_side_by_side(bench_bundle, tmp_path):
    out = tmp_path / "bundles.json"
    proc = run_script("bench_bundles.py", "--bundles", str(bench_bundle), str(REPO_ROOT / "bundles" / "fmnist-default"),
                      "--passes", "1", "8", "--repeats", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["images_per_pass"] for row in result["rows"]] == [1, 8]
    for row in result["rows"]:
        a, b = row["ms_per_pass"]["a"], row["ms_per_pass"]["b"]
        assert a > 0 and b > 0 and row["ratio_b_over_a"] == pytest.approx(b / a)
    assert re.search(r"^\s+8\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d$", proc.stdout, re.M)


def test_bench_engines_compares_the_two_forward_engines(tmp_path):
    # the shipped bundle, 8 images: every figure of both engines, and the checks they pass
    out = tmp_path / "engines.json"
    proc = run_script("bench_engines.py", "--images", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["images"] == 8 and summary["threads"] == 1
    assert summary["batch_independent"] == {"sparse": True, "dense": True}
    assert summary["same_classes"] is True and 0 < summary["max_score_difference"] < 1e-3
    for engine in ("sparse", "dense"):
        medians = summary["median_ms"][engine]
        assert set(medians) == {"inspect", "observe", "score", "pass8"} and all(v > 0 for v in medians.values())
    assert "dense/sparse" in proc.stdout


def test_bench_spread_times_the_three_passes_and_the_two_spreads(tmp_path):
    # the shipped bundle, 6 images, batch 8: every median, and the two ways of computing the spread agree
    out = tmp_path / "spread.json"
    proc = run_script("bench_spread.py", "--images", "6", "--rounds", "2", "--batch", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    medians = result["engine"]["median_ms_per_image"]
    assert len(medians) == 3 and all(v > 0 for v in medians.values())
    assert result["engine"]["max_abs_difference"] < 1e-5
    assert set(result["dense"]) == {"64x28x28", "128x14x14", "256x7x7"}  # vgg7's distinct block map shapes
    assert all(row["max_abs_difference"] < 1e-5 for row in result["dense"].values())
    assert "torch.var / two-pass spread" in proc.stdout


def test_bench_sparse_times_the_six_nets_and_profiles_the_per_image_ones(tmp_path):
    # the shipped bundle, 12 images: every latency (the two per-image nets compiled and as plain
    # Python), the ratios computed from them, the agreement checks, and --profile's operator table
    out = tmp_path / "sparse.json"
    proc = run_script("bench_sparse.py", "--n", "12", "--warmup", "2", "--profile", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    latency = result["latency"]
    assert set(latency) == {"plain", "dense_gated", "sparse_gated", "plain_folded", "sparse_eager", "folded_eager"}
    speedup = result["speedup"]
    assert speedup["plain_folded_over_sparse_median"] == pytest.approx(
        latency["plain_folded"]["median_ms"] / latency["sparse_gated"]["median_ms"])
    assert speedup["folded_eager_over_sparse_eager_median"] == pytest.approx(
        latency["folded_eager"]["median_ms"] / latency["sparse_eager"]["median_ms"])
    assert speedup["sparse_eager_over_sparse_median"] == pytest.approx(
        latency["sparse_eager"]["median_ms"] / latency["sparse_gated"]["median_ms"])
    # TorchScript is available in this torch build, and compiling changes no bit
    assert result["scripted"] == {"sparse_gated": True, "plain_folded": True}
    assert result["agreement"]["compiled_equals_eager"] is True
    assert result["agreement"]["identical_paths"] == 1.0 and result["agreement"]["same_prediction"] == 1.0
    assert result["agreement"]["max_abs_logit_diff"] < 1e-4
    assert 0 < result["flops"]["ratio_vs_plain"] < 1
    profile = result["profile_us_per_image"]
    for net in ("sparse_gated", "plain_folded"):
        # both run convolutions; only the skipping net gathers weights
        assert any("conv" in op and t > 0 for op, t in profile[net].items()), profile[net]
    assert profile["sparse_gated"].get("aten::index_select", 0) > 0
    assert profile["plain_folded"].get("aten::index_select", 0) == 0
    assert "under torch.profiler" in proc.stdout and "skipping alone" in proc.stdout


def test_bench_train_times_both_precisions_of_both_steps(tmp_path):
    # the small backbone, two timed steps: every median, the ratio computed from them, the recipe's estimate
    out = tmp_path / "train.json"
    proc = run_script("bench_train.py", "--architecture", "vgg-small", "--steps", "2", "--warmup", "1",
                      "--batch-size", "32", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["kinds"]) == {"plain", "decoupled"} and result["steps"] == 2
    for kind in result["kinds"].values():
        median = kind["median_s"]
        assert set(median) == {"fp32", "bf16"} and all(v > 0 for v in median.values())
        assert kind["ratio_fp32_over_bf16"] == pytest.approx(median["fp32"] / median["bf16"])
    assert result["recipe_s"]["fp32"] > 0 and result["recipe_s"]["bf16"] > 0
    assert "fp32/bf16" in proc.stdout and "the default recipe's" in proc.stdout


def test_bench_evaluation_floor_counts_the_protocols_passes_and_prices_them(tmp_path):
    # the shipped bundle and the real data; tiny timed batches (only the prices shrink, not the counts)
    out = tmp_path / "floor.json"
    proc = run_script("bench_evaluation_floor.py", "--batch", "4", "--repeats", "1", "--cores", "2",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    counts, sets = result["counts"], result["counts"]["sets"]
    # the presets' step counts times the protocol's images: FGSM 1, BIM 10, PGD 40, CW 11 (first
    # early-stop check) of 100, DeepFool one linearisation of at most 50
    assert sets["fgsm"]["gradient_min"] == sets["fgsm"]["gradient_full"] == 2000
    assert sets["bim"]["gradient_min"] == 20_000 and sets["pgd-low"]["gradient_full"] == 80_000
    assert (sets["cw"]["gradient_min"], sets["cw"]["gradient_full"]) == (22_000, 200_000)
    assert (sets["deepfool"]["deepfool_min"], sets["deepfool"]["deepfool_full"]) == (2000, 100_000)
    assert sets["supervised:pgd"]["gradient_min"] == 40_000 and "supervised:cw" not in sets
    # fgsm, bim, fgsm-low and bim-low of the same 2,000 images share one clean-image gradient; the
    # supervised fgsm is the only one of its images
    assert counts["shared_clean_gradients"] == 3 * 2000
    assert counts["gradient_min"] == sum(row["gradient_min"] for row in sets.values()) - 6000 == 261_000
    # 54,000 training + 10,000 test + 6,000 validation + 9 natural groups of 2,000
    assert counts["forward_images"] == 88_000
    s = result["seconds_per_image"]
    assert all(v > 0 for v in s.values())
    floor = 261_000 * s["gradient_step"] + 2000 * s["deepfool_linearisation"] + 88_000 * s["forward"]
    assert result["floor_cpu_s"] == pytest.approx(floor)
    assert result["floor_over_target"] == pytest.approx(floor / 2 / 600)
    assert result["full_steps_cpu_s"] - floor == pytest.approx((200_000 - 22_000) * s["gradient_step"])
    assert re.search(r"^floor: [\d,]+ CPU-s = [\d,]+ s on 2 core\(s\), [\d.]+x the 600 s target$", proc.stdout, re.M)


def test_bench_evaluation_floor_refuses_attacks_outside_the_protocol():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_evaluation_floor", BENCH / "bench_evaluation_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.attack_passes("pgd", 3) == {"gradient_min": 120, "gradient_full": 120, "deepfool_min": 0,
                                              "deepfool_full": 0}
    with pytest.raises(ValueError, match="not one of the protocol's attacks"):
        module.attack_passes("pgd-bpda", 3)   # its surrogate's passes cost something else
