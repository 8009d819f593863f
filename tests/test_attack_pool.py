"""pathguard.jobs.attack_pool: attack sets from worker processes are the
sets generate_attack_set makes in this process with the same number of
torch threads, bit for bit.  (Across thread counts they can differ:
bench/bench_attack_workers.py found DeepFool's sets 1 image in 512 apart,
by 1.5e-8; FGSM, PGD and CW bit-identical.)"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from pathguard.attacks.generate import generate_attack_set
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle
from pathguard.detector.data import load_dataset
from pathguard.jobs.attack_pool import DEEPFOOL_PASSES_PER_STEP, AttackPool, attack_cost, default_workers

# few steps: the point is the arithmetic, not the attack's strength
STEPS = {"pgd": {"steps": 5}, "cw": {"steps": 5}, "deepfool": {"steps": 5}}


@pytest.fixture(scope="module")
def shipped():
    bundle = load_bundle(DEFAULT_BUNDLE)
    test = load_dataset("fashion-mnist", "test").head(48)
    return bundle, test


def _tasks(test) -> dict:
    halves = {"a": slice(0, 24), "b": slice(24, 48)}
    return {f"{name}:{half}": (test.images[rows], test.labels[rows], name, 3, STEPS.get(name))
            for name in ("fgsm", "pgd", "cw", "deepfool") for half, rows in halves.items()}


def test_two_workers_give_the_sets_this_process_gives(shipped):
    bundle, test = shipped
    tasks = _tasks(test)
    with AttackPool(bundle.decoupled, bundle.path, bundle.digest, workers=2, threads=1) as pool:
        pool.submit_all(tasks)
        from_workers = {key: pool.result(key) for key in reversed(list(tasks))}
    # closed: a worker's finished set is still there (never silently made again here)
    key = next(iter(tasks))
    assert torch.equal(pool.result(key).adversarial, from_workers[key].adversarial)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit_all({"late": tasks[key]})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' count
    try:
        here_sets = {key: generate_attack_set(bundle.decoupled, images, labels, name, seed=seed,
                                              overrides=overrides, progress=False)
                     for key, (images, labels, name, seed, overrides) in tasks.items()}
    finally:
        torch.set_num_threads(threads)
    for key, (images, labels, name, seed, overrides) in tasks.items():
        here = here_sets[key]
        there = from_workers[key]
        assert there.attack == name and there.seed == seed and there.config == here.config
        assert torch.equal(there.adversarial, here.adversarial), key
        assert torch.equal(there.success, here.success), key
        assert torch.equal(there.pred_adversarial, here.pred_adversarial), key
    # the attacks did something (a test that compares two no-ops proves nothing)
    assert sum(int(from_workers[f"{n}:a"].success.sum()) for n in ("fgsm", "pgd", "cw", "deepfool")) > 10


def test_one_worker_runs_in_this_process_when_collected(shipped):
    bundle, test = shipped
    tasks = dict(list(_tasks(test).items())[:2])
    pool = AttackPool(bundle.decoupled, bundle.path, bundle.digest, workers=1)
    pool.submit_all(tasks)
    key = next(iter(tasks))
    images, labels, name, seed, overrides = tasks[key]
    expected = generate_attack_set(bundle.decoupled, images, labels, name, seed=seed, overrides=overrides,
                                   progress=False)
    assert torch.equal(pool.result(key).adversarial, expected.adversarial)
    with pytest.raises(KeyError, match="no attack task"):
        pool.result("pgd:c")
    with pytest.raises(ValueError, match="submitted twice"):
        pool.submit_all({key: tasks[key]})
    pool.close()
    with pytest.raises(RuntimeError, match="closed: attack task .* was not run"):
        pool.result(list(tasks)[1])  # a closed one-worker pool does not start an attack


def test_costliest_tasks_go_first_and_bad_settings_are_refused(shipped):
    bundle, test = shipped
    pool = AttackPool(bundle.decoupled, bundle.path, bundle.digest, workers=1)
    images, labels = test.images[:4], test.labels[:4]
    pool.submit_all({"small-cw": (images[:1], labels[:1], "cw", 0, None),
                     "fgsm": (images, labels, "fgsm", 0, None),
                     "cw": (images, labels, "cw", 0, None),
                     "pgd": (images, labels, "pgd", 0, None)})
    assert pool.order == ["cw", "pgd", "small-cw", "fgsm"]
    with pytest.raises(ValueError, match="unknown attack 'pdg'"):
        pool.submit_all({"typo": (images, labels, "pdg", 0, None)})
    with pytest.raises(ValueError, match="workers must be >= 1"):
        AttackPool(bundle.decoupled, bundle.path, bundle.digest, workers=0)
    assert default_workers(torch.device("cpu"), tasks=1) == 1
    assert default_workers(torch.device("cuda"), tasks=10) == 1
    assert 1 <= default_workers(torch.device("cpu"), tasks=10) <= 4


def test_a_worker_refuses_a_bundle_that_is_not_the_callers(shipped):
    bundle, test = shipped
    with AttackPool(bundle.decoupled, bundle.path, "0" * 64, workers=2) as pool:
        pool.submit_all({"fgsm": (test.images[:4], test.labels[:4], "fgsm", 0, None)})
        with pytest.raises(BrokenProcessPool):
            pool.result("fgsm")


def test_an_error_stops_the_workers_without_waiting_for_their_attacks(shipped):
    """Ctrl-C or an error in the caller must not leave it waiting for a CW set that takes hours."""
    bundle, test = shipped
    endless = (test.images[:8], test.labels[:8], "cw", 0, {"steps": 10_000_000})
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="the caller failed"):
        with AttackPool(bundle.decoupled, bundle.path, bundle.digest, workers=2, threads=1) as pool:
            pool.submit_all({"a": endless, "b": endless})
            workers = set(multiprocessing.active_children()) - before
            assert len(workers) == 2
            raise RuntimeError("the caller failed")
    for process in workers:
        process.join(timeout=30)
        assert not process.is_alive()


CALLER_KILLED = """
import multiprocessing, sys, time
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle
from pathguard.detector.data import load_dataset
from pathguard.jobs.attack_pool import AttackPool
bundle, test = load_bundle(DEFAULT_BUNDLE), load_dataset("fashion-mnist", "test").head(8)
endless = (test.images, test.labels, "cw", 0, {"steps": 10_000_000})
pool = AttackPool(bundle.decoupled, bundle.path, bundle.digest, workers=2, threads=1)
pool.submit_all({"a": endless, "b": endless})
while len(multiprocessing.active_children()) < 2:
    time.sleep(0.1)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_workers_end_when_their_caller_is_killed_outright():
    """SIGKILL (or a plain SIGTERM) skips AttackPool.__exit__: the workers must
    notice that their caller is gone and stop, not run a CW set for an hour."""
    caller = subprocess.Popen([sys.executable, "-c", CALLER_KILLED], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in caller.stdout.readline().split()]
        assert len(workers) >= 2 and all(_running(pid) for pid in workers)
        time.sleep(8)  # the workers load the bundle and take their CW set (a worker between tasks stops anyway)
        assert all(_running(pid) for pid in workers)
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=30)
        deadline = time.time() + 30
        while any(_running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in workers)
    finally:
        caller.kill()


def test_attack_costs_follow_the_presets_steps():
    """The hand-out order comes from each preset's steps (and the overrides),
    not from a copy of them."""
    assert attack_cost("fgsm") == 1 and attack_cost("bim") == 10 and attack_cost("pgd-low") == 40
    assert attack_cost("cw") == 100
    assert attack_cost("deepfool") == 50 * DEEPFOOL_PASSES_PER_STEP
    assert attack_cost("pgd", {"steps": 5}) == 5 and attack_cost("cw", {"steps": 7}) == 7
    assert attack_cost("deepfool-bpda") == attack_cost("deepfool")  # a BPDA twin costs as its base
    costs = [attack_cost(n) for n in ("cw", "deepfool", "pgd", "bim", "fgsm")]
    assert costs == sorted(costs, reverse=True)
