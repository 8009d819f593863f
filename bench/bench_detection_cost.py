"""What detection costs: decoupled forward + path score vs the plain forward.

Both run at batch 256 on the same real test images, interleaved (plain,
detect, plain, detect, ...) so that machine noise hits both alike; the
ratio of medians is printed.  Usage:

    .venv/bin/python bench/bench_detection_cost.py [--bundle B] [--batch 256] [--repeats 20] [--threads 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pathguard.detector.bundle import DEFAULT_BUNDLE  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.detector.inspection import Inspector  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    inspector = Inspector.load(args.bundle)
    plain, decoupled, detector = inspector.bundle.plain.eval(), inspector.model, inspector.detector
    images = load_dataset("fashion-mnist", "test").images[: args.batch]

    def run_plain():
        with torch.no_grad():
            plain(images)

    def run_detect():
        detector.score_samples(detector.observe(decoupled, images, batch_size=args.batch))

    for fn in (run_plain, run_detect):  # warm-up
        fn()
    times = {"plain": [], "detect": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", run_plain), ("detect", run_detect)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "plain_ms_per_batch": 1000 * med["plain"], "detect_ms_per_batch": 1000 * med["detect"],
        "ratio_detect_over_plain": med["detect"] / med["plain"], "score": detector.name,
    }
    print(f"batch {args.batch}, {args.repeats} interleaved repeats, {args.threads} threads, {result['machine']}")
    print(f"  plain forward:                  {result['plain_ms_per_batch']:8.2f} ms/batch (median)")
    print(f"  decoupled forward + path score: {result['detect_ms_per_batch']:8.2f} ms/batch (median)")
    print(f"  ratio (detection / plain):      {result['ratio_detect_over_plain']:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
