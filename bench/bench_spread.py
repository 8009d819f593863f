"""What the blocks' spatial spread costs, and what computing it from the
centred squares instead of ``torch.var`` saves, measured side by side.

The spread (``models.spatial_spread``: sqrt(var over space + eps) per
channel) is read by ``fusion-moments``, the shipped detector, so every
``blocks=True`` pass computes it.  Two parts, each interleaved (the
variants alternate which goes first, so load drifts hit all alike):

  * the skipping engine's per-image pass (``SparseGatedNet.trace_one``,
    what the service runs per image on a CPU) over ``--images`` real
    Fashion-MNIST test images on ``--threads`` torch threads: without the
    blocks (``blocks=False``), with them as shipped (two-pass spread), and
    with the spread through ``torch.var`` (the code before);
  * the dense batch spread (``models.spatial_spread``) on random maps of
    the default bundle's block shapes, batch ``--batch``: two-pass against
    ``torch.var``.

It prints medians and the ratios, and checks that the two ways agree to
float tolerance.

    .venv/bin/python bench/bench_spread.py [--bundle DIR] [--images 300] [--threads 1] [--json out.json]
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

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import pathguard.detector.acceleration as acceleration  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.detector.models import SPREAD_EPS, spatial_spread  # noqa: E402

SHIPPED_MOMENTS = acceleration._spatial_moments


def var_moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image mean and spread through torch's var kernel (before)."""
    flat = h.reshape(h.shape[1], h.shape[2] * h.shape[3])
    return flat.mean(1), (flat.var(1, correction=0) + SPREAD_EPS).sqrt()


def var_spread(activation: torch.Tensor) -> torch.Tensor:
    return (activation.var(dim=(2, 3), correction=0) + SPREAD_EPS).sqrt()


def per_image_ms(net, images: torch.Tensor, blocks: bool, moments) -> float:
    acceleration._spatial_moments = moments
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(len(images)):
                net.trace_one(images[i:i + 1], blocks=blocks)
        return 1000 * (time.perf_counter() - started) / len(images)
    finally:
        acceleration._spatial_moments = SHIPPED_MOMENTS


def engine_part(net, images: torch.Tensor, rounds: int) -> dict:
    variants = {"no blocks": (False, SHIPPED_MOMENTS), "blocks, two-pass spread (shipped)": (True, SHIPPED_MOMENTS),
                "blocks, torch.var spread (before)": (True, var_moments)}
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(per_image_ms(net, images, *variants[name]))
    with torch.inference_mode():  # the two ways give the same spreads
        a = net.trace_one(images[:1], blocks=True).block_spreads
        acceleration._spatial_moments = var_moments
        b = net.trace_one(images[:1], blocks=True).block_spreads
        acceleration._spatial_moments = SHIPPED_MOMENTS
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return {"median_ms_per_image": {k: statistics.median(v) for k, v in times.items()}, "max_abs_difference": worst}


def dense_part(shapes: list[tuple[int, int, int]], batch: int, rounds: int) -> dict:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for c, h, w in shapes:
        maps = torch.rand(batch, c, h, w, generator=gen).relu_()
        times = {"two-pass": [], "torch.var": []}
        for r in range(rounds):
            for name in (("two-pass", "torch.var") if r % 2 == 0 else ("torch.var", "two-pass")):
                fn = spatial_spread if name == "two-pass" else var_spread
                started = time.perf_counter()
                fn(maps)
                times[name].append(1000 * (time.perf_counter() - started))
        out[f"{c}x{h}x{w}"] = {"median_ms": {k: statistics.median(v) for k, v in times.items()},
                               "max_abs_difference": float((spatial_spread(maps) - var_spread(maps)).abs().max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(args.bundle).decoupled.eval()
    net = acceleration.SparseGatedNet(model)
    images = load_dataset("fashion-mnist", "test").images[:args.images]
    # every block's map shape (channels, height, width): the size halves after each pooled block
    shapes, size = [], model.arch.image_size
    for block, pooled in zip(model.blocks, model.pool_after):
        shapes.append((block.conv.out_channels, size, size))
        size //= 2 if pooled else 1
    result = {"engine": engine_part(net, images, args.rounds), "dense": dense_part(shapes, args.batch, args.rounds),
              "images": args.images, "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
              "bundle": args.bundle}
    med = result["engine"]["median_ms_per_image"]
    base, shipped, before = med["no blocks"], med["blocks, two-pass spread (shipped)"], \
        med["blocks, torch.var spread (before)"]
    print(f"skipping engine, per image ({args.images} images, {args.threads} thread(s), median of {args.rounds}):")
    for name, ms in med.items():
        print(f"  {name:36s} {ms:.3f} ms  ({ms / base:.3f}x no blocks)")
    print(f"  torch.var / two-pass spread: {before / shipped:.3f}x the per-image pass; "
          f"spreads agree to {result['engine']['max_abs_difference']:.1e}")
    print(f"dense spread, batch {args.batch}:")
    for shape, row in result["dense"].items():
        m = row["median_ms"]
        print(f"  {shape:12s} two-pass {m['two-pass']:.2f} ms, torch.var {m['torch.var']:.2f} ms, "
              f"ratio {m['torch.var'] / m['two-pass']:.2f}x, agree to {row['max_abs_difference']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
