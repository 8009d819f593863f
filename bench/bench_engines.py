"""The two forward engines of ``Inspector`` side by side, in-process.

For ``--images`` real Fashion-MNIST test images, on one torch thread by
default (what each of the service's inference workers uses on two cores),
this times, interleaved image by image (the engines alternate which goes
first, so drifts in machine load and cold caches hit both alike):

  * a lone image: ``Inspector.inspect`` of one image (what one client pays),
    and its parts: the observation (the forward pass and what the detector
    reads, ``Inspector.observe``) and the scoring (``score_and_evidence``
    of the padded pass);
  * passes of 8: ``Inspector.inspect`` of 8 images, per image.

It prints the medians (ms) per engine and the ratio dense / sparse, and
checks that each engine answers a lone image bit for bit as inside the pass
of 8 (the determinism the service promises) and that the two engines agree
to float tolerance.

    .venv/bin/python bench/bench_engines.py [--bundle DIR] [--images 64] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pathguard.detector.bundle import DEFAULT_BUNDLE  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.detector.inspection import Inspector, pad_rows  # noqa: E402

ENGINES = ("sparse", "dense")
PASS = 8


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - started)


def lone_parts(inspector: Inspector, image: torch.Tensor) -> dict[str, float]:
    """ms of one lone image: the whole ``inspect``, then its observation and
    scoring at the pass size ``inspect`` uses for one image."""
    size = min(s for s in inspector.pass_sizes() if s >= 1)
    padded = pad_rows(image, size)
    with torch.inference_mode():
        whole = timed(lambda: inspector.inspect(image))
        observe = timed(lambda: inspector.observe(padded, 1))
        batch = inspector.observe(padded, 1)
        score = timed(lambda: inspector.detector.score_and_evidence(batch))
    return {"inspect": whole, "observe": observe, "score": score}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--images", type=int, default=64, help="real test images (a multiple of 8 is used)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = max(PASS, args.images // PASS * PASS)
    images = load_dataset("fashion-mnist", "test").images[:n].float().contiguous()
    inspectors = {engine: Inspector.load(args.bundle, engine=engine) for engine in ENGINES}
    for inspector in inspectors.values():  # warm-up, and the pass sizes measured once
        inspector.inspect(images[:PASS])
        inspector.inspect(images[:1])

    times: dict[str, dict[str, list[float]]] = {e: {"inspect": [], "observe": [], "score": [], "pass8": []}
                                                for e in ENGINES}
    for i in range(n):
        order = ENGINES if i % 2 else ENGINES[::-1]
        for engine in order:
            for part, ms in lone_parts(inspectors[engine], images[i:i + 1]).items():
                times[engine][part].append(ms)
    for start in range(0, n, PASS):
        order = ENGINES if (start // PASS) % 2 else ENGINES[::-1]
        for engine in order:
            times[engine]["pass8"].append(timed(lambda: inspectors[engine].inspect(images[start:start + PASS])) / PASS)

    answers = {e: inspectors[e].inspect(images) for e in ENGINES}
    alone = {e: [inspectors[e].inspect(images[i:i + 1])[0].score for i in range(n)] for e in ENGINES}
    batch_independent = {e: alone[e] == [a.score for a in answers[e]] for e in ENGINES}
    dense, sparse = (np.array([a.score for a in answers[e]]) for e in ("dense", "sparse"))
    max_diff = float(np.abs(dense - sparse).max())
    same_classes = [a.predicted_class for a in answers["dense"]] == [a.predicted_class for a in answers["sparse"]]

    medians = {e: {part: statistics.median(v) for part, v in parts.items()} for e, parts in times.items()}
    labels = {"inspect": "lone image, inspect", "observe": "  its observation", "score": "  its scoring",
              "pass8": "pass of 8, per image"}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{n} test images, interleaved; bundle {Path(args.bundle).resolve()}")
    print("pass sizes: " + "; ".join(f"{e} {inspectors[e].pass_sizes()}" for e in ENGINES))
    print(f"{'median ms':<22} {'sparse':>8} {'dense':>8} {'dense/sparse':>12}")
    for part, label in labels.items():
        s, d = medians["sparse"][part], medians["dense"][part]
        print(f"{label:<22} {s:>8.3f} {d:>8.3f} {d / s:>11.2f}x")
    print("a lone image bit for bit as inside a batch: " + ", ".join(
        f"{e} {batch_independent[e]}" for e in ENGINES))
    print(f"engines agree: max |score difference| {max_diff:.2e}, same classes {same_classes}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "threads": args.threads, "images": n, "bundle": str(Path(args.bundle).resolve()),
            "pass_sizes": {e: inspectors[e].pass_sizes() for e in ENGINES}, "median_ms": medians,
            "batch_independent": batch_independent, "max_score_difference": max_diff,
            "same_classes": same_classes}, indent=2) + "\n")
    ok = all(batch_independent.values()) and same_classes and max_diff < 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
