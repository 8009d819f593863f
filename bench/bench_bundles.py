"""What serving one bundle costs against another: Inspector.inspect, side by side.

A candidate model is shipped for its detection figures, but the service pays
its forward pass on every request.  This prints, for each pass size, the
median milliseconds per pass of ``Inspector.inspect`` (the service's whole
per-image work: forward pass, path, detector score, layer evidence) for two
bundles, measured **interleaved** in one run (A, B, A, B, ...: this shared
VM's speed drifts by up to 2x over minutes, so only side-by-side figures
compare), and B's time as a ratio to A's.

    .venv/bin/python bench/bench_bundles.py --bundles bundles/fmnist-vgg-small bundles/fmnist-default
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_service import as_tensor, load_images, machine_info  # noqa: E402

from pathguard.detector.inspection import Inspector  # noqa: E402


def time_pass(inspector: Inspector, images: torch.Tensor) -> float:
    started = time.perf_counter()
    inspector.inspect(images)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs=2, required=True, metavar=("A", "B"),
                        help="the two bundles; ratios are B / A")
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 8, 64], help="images per pass")
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per bundle and pass size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one service worker's)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # chunk=None and the dense engine: each pass is computed as given, so the pass size is what is measured
    inspectors = [Inspector.load(path, chunk=None, engine="dense") for path in args.bundles]
    shapes = {tuple(ins.input_shape) for ins in inspectors}
    if len(shapes) != 1:
        parser.error(f"the two bundles take different inputs: {sorted(shapes)}")
    images = as_tensor(load_images(args.dataset, max(args.passes), inspectors[0].input_shape))
    info = machine_info(args.threads)
    print(f"machine: {info['machine']} {info['cpu']}, {info['usable_cpus']} usable CPUs; torch {info['torch']}, "
          f"{args.threads} thread(s); {args.repeats} interleaved passes per bundle and size")
    rows = []
    for size in args.passes:
        batch = images[:size]
        for inspector in inspectors:  # warm-up, and the answers must be whole
            assert len(inspector.inspect(batch)) == size
        times: list[list[float]] = [[], []]
        for _ in range(args.repeats):
            for i, inspector in enumerate(inspectors):
                times[i].append(time_pass(inspector, batch))
        a, b = (1000 * statistics.median(t) for t in times)
        rows.append({"images_per_pass": size, "ms_per_pass": {"a": a, "b": b}, "ratio_b_over_a": b / a})
    print(f"A = {args.bundles[0]}\nB = {args.bundles[1]}")
    print(f"{'images/pass':>11} {'A ms/pass':>10} {'B ms/pass':>10} {'B / A':>7}")
    for row in rows:
        print(f"{row['images_per_pass']:>11} {row['ms_per_pass']['a']:>10.2f} {row['ms_per_pass']['b']:>10.2f} "
              f"{row['ratio_b_over_a']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "bundles": args.bundles, "threads": args.threads,
                                               "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
