"""Forward pass and full inspection: torch's max_pool2d vs the exact fast pool.

``detector.models.max_pool_2x2`` replaces ``nn.functional.max_pool2d(x, 2)``
in every forward pass that needs no gradient (CPU): the same values bit for
bit, computed as the elementwise maximum of four strided views.  This
measures, in one run and interleaved (the two variants alternate repeat by
repeat, so drifts in machine load hit both alike), the median time of

  * the decoupled model's forward pass (``model(x)``) and
  * ``Inspector.inspect`` (forward pass + detector + answers, the service's
    per-batch work, in chunks of ``--chunk``)

for several batch sizes, with each pool; it prints the ratio old / new and
checks that logits and scores are equal bit for bit.

    .venv/bin/python bench/bench_forward.py [--bundle DIR] [--batches 1 8 64] [--repeats 15]
        [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import pathguard.detector.models as models  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.detector.inspection import Inspector  # noqa: E402

FAST = models.max_pool_2x2


def torch_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def use_pool(pool) -> None:
    models.max_pool_2x2 = pool


def time_call(fn, calls: int) -> float:
    """Seconds per call, over ``calls`` back-to-back calls."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def measure(inspector: Inspector, images: torch.Tensor, repeats: int) -> dict:
    """Median ms per image of model(x) and inspect(x), each pool, interleaved."""
    model = inspector.model
    calls = max(1, 64 // len(images))
    jobs = {"forward": lambda: model(images), "inspect": lambda: inspector.inspect(images)}
    times = {(job, pool): [] for job in jobs for pool in ("max_pool2d", "fast")}
    with torch.inference_mode():
        for pool in (torch_pool, FAST):  # warm-up, both
            use_pool(pool)
            for fn in jobs.values():
                fn()
        for _ in range(repeats):
            for name, pool in (("max_pool2d", torch_pool), ("fast", FAST)):
                use_pool(pool)
                for job, fn in jobs.items():
                    times[(job, name)].append(1000 * time_call(fn, calls) / len(images))
        use_pool(torch_pool)
        reference_logits, reference = model(images), inspector.inspect(images)
        use_pool(FAST)
        fast_logits, fast = model(images), inspector.inspect(images)
    row = {"batch": len(images), "logits_equal": bool(torch.equal(reference_logits, fast_logits)),
           "scores_equal": all(a.score == b.score and a.evidence == b.evidence for a, b in zip(reference, fast))}
    for job in jobs:
        old = statistics.median(times[(job, "max_pool2d")])
        new = statistics.median(times[(job, "fast")])
        row[job] = {"max_pool2d_ms_per_image": old, "fast_ms_per_image": new, "speedup": old / new}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--chunk", type=int, default=8, help="Inspector chunk (the service's forward_chunk)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    inspector = Inspector.load(args.bundle, chunk=args.chunk)
    test = load_dataset("fashion-mnist", "test").images[:max(args.batches)].float()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"Inspector chunk {args.chunk}, {args.repeats} interleaved repeats; ms per image (median)")
    print(f"{'batch':>5} {'job':>8} {'max_pool2d':>10} {'fast':>8} {'speedup':>7}  bit-identical")
    rows = []
    try:
        for batch in args.batches:
            row = measure(inspector, test[:batch].contiguous(), args.repeats)
            rows.append(row)
            for job in ("forward", "inspect"):
                r = row[job]
                same = row["logits_equal"] if job == "forward" else row["scores_equal"]
                print(f"{batch:>5} {job:>8} {r['max_pool2d_ms_per_image']:>10.3f} {r['fast_ms_per_image']:>8.3f} "
                      f"{r['speedup']:>6.2f}x  {same}")
    finally:
        use_pool(FAST)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "chunk": args.chunk, "rows": rows},
                                              indent=2) + "\n")
    return 0 if all(r["logits_equal"] and r["scores_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
