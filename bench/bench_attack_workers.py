"""Attack sets one after another in one process vs side by side in workers.

``pathguard evaluate`` hands its attack sets to ``pathguard.jobs.attack_pool``
(one worker process per core, each with its share of the torch threads).
This measures, in one run and per attack, the wall time of two sets of
``--n`` test images of the shipped bundle

  * one after the other in this process with all its torch threads, and
  * side by side in an ``AttackPool`` of ``--workers`` workers (started and
    warmed up before the clock starts: an evaluation pays the start-up once,
    about 3-5 s, which is printed separately),

and prints the ratio (sets per second, pool / one process) and whether the
pool's sets are bit-identical to this process's (they can differ where an
attack's arithmetic depends on the thread count; docs/evaluation.md).

    .venv/bin/python bench/bench_attack_workers.py [--attacks pgd cw deepfool] [--n 256]
        [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pathguard.attacks.generate import generate_attack_set  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.jobs.attack_pool import AttackPool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--attacks", nargs="+", default=["pgd", "cw", "deepfool"])
    parser.add_argument("--n", type=int, default=256, help="images per set (two sets per attack)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    model = bundle.decoupled
    test = load_dataset("fashion-mnist", "test").head(2 * args.n)
    halves = [(test.images[:args.n], test.labels[:args.n]), (test.images[args.n:], test.labels[args.n:])]
    threads = torch.get_num_threads()
    rows = []
    started = time.perf_counter()
    with AttackPool(model, bundle.path, bundle.digest, workers=args.workers) as pool:
        pool.submit_all({f"warm-up {k}": (test.images[:2], test.labels[:2], "fgsm", args.seed, None)
                         for k in range(args.workers)})
        for k in range(args.workers):
            pool.result(f"warm-up {k}")
        startup = time.perf_counter() - started
        for name in args.attacks:
            t = time.perf_counter()
            serial = [generate_attack_set(model, x, y, name, seed=args.seed, progress=False) for x, y in halves]
            serial_s = time.perf_counter() - t
            t = time.perf_counter()
            pool.submit_all({f"{name} {k}": (x, y, name, args.seed, None) for k, (x, y) in enumerate(halves)})
            parallel = [pool.result(f"{name} {k}") for k in range(len(halves))]
            parallel_s = time.perf_counter() - t
            here = torch.cat([a.adversarial for a in serial])
            there = torch.cat([b.adversarial for b in parallel])
            differing = int((here != there).flatten(1).any(dim=1).sum())
            rows.append({"attack": name, "images": 2 * args.n, "one_process_s": serial_s, "workers_s": parallel_s,
                         "speedup": serial_s / parallel_s, "bit_identical": differing == 0,
                         "images_differing": differing, "max_abs_difference": float((here - there).abs().max())})
    info = {"machine": platform.machine(), "torch": torch.__version__, "threads": threads, "workers": args.workers,
            "worker_threads": max(1, threads // args.workers), "pool_startup_s": startup, "rows": rows}
    print(f"{info['machine']}, torch {info['torch']}: one process with {threads} thread(s) vs {args.workers} "
          f"workers with {info['worker_threads']} thread(s) each; two sets of {args.n} images per attack; "
          f"pool start-up {startup:.1f} s (not in the times)")
    print(f"{'attack':<10} {'one process s':>14} {'workers s':>10} {'speedup':>8}  bit-identical  "
          f"(images differing, largest difference)")
    for r in rows:
        print(f"{r['attack']:<10} {r['one_process_s']:>14.1f} {r['workers_s']:>10.1f} {r['speedup']:>7.2f}x  "
              f"{r['bit_identical']}  ({r['images_differing']}, {r['max_abs_difference']:.2g})")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
