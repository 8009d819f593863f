"""Batch-1 latency: plain vs dense gated vs filter-skipping gated network.

Measures, in one run and interleaved image by image (the order of the three
models rotates per image, so drifts in machine load hit all of them alike):

  (a) the plain network (bundle.plain),
  (b) the dense gated decoupled network (bundle.decoupled, eval mode: every
      filter is computed, then multiplied by its 0/1 gate),
  (c) detector.acceleration.SparseGatedNet built from (b): only the active
      filters are computed, reading only active input channels;
  (d) a control: SparseGatedNet built from (a), i.e. the plain network with
      BatchNorm folded, through the same per-image code path but with no
      gates.  d/c isolates the gain from skipping filters from the gains of
      BN folding and a leaner Python path;
  (e), (f) (c) and (d) with their per-image loop run as plain Python
      (``SparseGatedNet(..., compiled=False)``) instead of compiled by
      TorchScript: what the compilation buys, same images, same run.

It prints median and mean wall-clock latency per image (after a warm-up),
the speedups b/c and a/c, the FLOP accounting of detector.acceleration
(mean executed MACs / dense MACs), the accuracy of (b) and (c) on the same
images and their agreement (logits, predictions, paths).

Threads default to 1: at batch size 1 and 28x28 inputs a convolution is a
few million MACs, so intra-op threading mostly adds synchronisation
overhead and noise; one thread measures the arithmetic saved.

    .venv/bin/python bench/bench_sparse.py [--bundle DIR] [--n 300] [--threads 1] [--json out.json] [--profile]

``--profile`` adds where each per-image net spends its time, operator by
operator (torch.profiler, after the timed runs, which it does not affect).

If the bundle directory is absent, it says so and benchmarks a randomly
initialised vgg-small whose ACMs are randomised (about half of the gates
off); accuracy is then at chance level and only the timings and the FLOP
ratio mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pathguard.detector.acceleration import SparseGatedNet, flop_summary, randomise_controls  # noqa: E402
from pathguard.detector.artifacts import ArtifactError  # noqa: E402
from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from pathguard.detector.data import load_dataset  # noqa: E402
from pathguard.detector.models import ARCHITECTURES, ConvNet  # noqa: E402


def random_models(seed: int) -> tuple[ConvNet, ConvNet, str]:
    torch.manual_seed(seed)
    arch = ARCHITECTURES["vgg-small"]
    decoupled = randomise_controls(ConvNet(arch, gated=True), seed=seed)
    plain = ConvNet(arch, gated=False)
    plain.load_state_dict({k: v for k, v in decoupled.state_dict().items() if ".control." not in k})
    return plain.eval(), decoupled.eval(), f"random vgg-small (seed {seed}, ACMs randomised)"


def load_models(bundle_path: str | None, seed: int) -> tuple[ConvNet, ConvNet, str]:
    path = Path(bundle_path) if bundle_path else DEFAULT_BUNDLE
    if not (path / "manifest.json").is_file():
        print(f"NOTE: no bundle at {path} (no manifest.json); benchmarking a randomly initialised "
              f"vgg-small with randomised ACMs instead. Accuracy will be at chance level; the "
              f"latencies and FLOP ratio are still meaningful for that gate sparsity.")
        return random_models(seed)
    try:
        bundle = load_bundle(path)  # a present but broken bundle is an error, not a fallback
    except ArtifactError as exc:
        raise SystemExit(f"error: the bundle at {path} exists but cannot be loaded: {exc}") from exc
    return bundle.plain.eval(), bundle.decoupled.eval(), f"bundle {path}"


def operator_times(run, images: torch.Tensor) -> dict[str, float]:
    """Self CPU time per image (us) of every aten operator ``run`` launches
    over ``images`` one at a time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(len(images)):
            run(images[i:i + 1])
    return {e.key: e.self_cpu_time_total / len(images) for e in prof.key_averages() if e.self_cpu_time_total > 0}


def cpu_name() -> str:
    """platform.processor() is often empty on Linux; fall back to /proc/cpuinfo."""
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def summarise(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min_ms": ordered[0],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help=f"bundle directory (default {DEFAULT_BUNDLE})")
    parser.add_argument("--random", action="store_true", help="ignore any bundle; use the random vgg-small")
    parser.add_argument("--n", type=int, default=300, help="number of Fashion-MNIST test images (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed warm-up images per model (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: at batch 1 threading mostly adds overhead)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random fallback model")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="also run both per-image nets under torch.profiler and print where their time goes "
                             "(self CPU time per image of the costliest operators; the profiler adds overhead)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.random:
        plain, decoupled, source = random_models(args.seed)
    else:
        plain, decoupled, source = load_models(args.bundle, args.seed)
    sparse = SparseGatedNet(decoupled)
    folded_plain = SparseGatedNet(plain)
    sparse_eager = SparseGatedNet(decoupled, compiled=False)
    folded_plain_eager = SparseGatedNet(plain, compiled=False)

    data = load_dataset("fashion-mnist", "test").head(args.n)
    images, labels = data.images, data.labels
    if tuple(images.shape[1:]) != (decoupled.arch.in_channels, decoupled.arch.image_size, decoupled.arch.image_size):
        raise SystemExit(f"model expects {decoupled.arch.in_channels}x{decoupled.arch.image_size}^2 images, "
                         f"Fashion-MNIST gives {tuple(images.shape[1:])}")
    n = len(images)

    runners = {
        "plain": lambda x: plain(x)[0],
        "dense_gated": lambda x: decoupled(x)[0],
        "sparse_gated": lambda x: sparse.trace_one(x).logits,
        "plain_folded": lambda x: folded_plain.trace_one(x).logits,
        "sparse_eager": lambda x: sparse_eager.trace_one(x).logits,
        "folded_eager": lambda x: folded_plain_eager.trace_one(x).logits,
    }
    names = list(runners)
    times = {k: [] for k in names}
    logits = {k: [None] * n for k in names}

    with torch.inference_mode():
        for i in range(min(args.warmup, n)):
            for name in names:
                runners[name](images[i:i + 1])
        for i in range(n):
            x = images[i:i + 1]
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                t0 = time.perf_counter()
                out = runners[name](x)
                times[name].append((time.perf_counter() - t0) * 1e3)
                logits[name][i] = out
        logits = {k: torch.stack(v) for k, v in logits.items()}
        dense_path = decoupled.trace(images).path
        sparse_path = torch.stack([sparse.trace_one(images[i:i + 1]).path for i in range(n)])

    latency = {k: summarise(v) for k, v in times.items()}
    flops = flop_summary(decoupled, images)
    accuracy = {k: float((v.argmax(1) == labels).float().mean()) for k, v in logits.items()}
    result = {
        "model": source,
        "images": n,
        "warmup": args.warmup,
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "latency": latency,
        "speedup": {
            "dense_over_sparse_median": latency["dense_gated"]["median_ms"] / latency["sparse_gated"]["median_ms"],
            "dense_over_sparse_mean": latency["dense_gated"]["mean_ms"] / latency["sparse_gated"]["mean_ms"],
            "plain_over_sparse_median": latency["plain"]["median_ms"] / latency["sparse_gated"]["median_ms"],
            "plain_over_sparse_mean": latency["plain"]["mean_ms"] / latency["sparse_gated"]["mean_ms"],
            "plain_folded_over_sparse_median":
                latency["plain_folded"]["median_ms"] / latency["sparse_gated"]["median_ms"],
            "folded_eager_over_sparse_eager_median":
                latency["folded_eager"]["median_ms"] / latency["sparse_eager"]["median_ms"],
            "sparse_eager_over_sparse_median":
                latency["sparse_eager"]["median_ms"] / latency["sparse_gated"]["median_ms"],
        },
        "scripted": {"sparse_gated": sparse.scripted, "plain_folded": folded_plain.scripted},
        "flops": flops,
        "active_fraction": float(dense_path.mean()),
        "accuracy": accuracy,
        "agreement": {
            "max_abs_logit_diff": float((logits["dense_gated"] - logits["sparse_gated"]).abs().max()),
            "same_prediction":
                float((logits["dense_gated"].argmax(1) == logits["sparse_gated"].argmax(1)).float().mean()),
            "identical_paths": float((dense_path == sparse_path).all(dim=1).float().mean()),
            "compiled_equals_eager": bool(torch.equal(logits["sparse_gated"], logits["sparse_eager"])
                                          and torch.equal(logits["plain_folded"], logits["folded_eager"])),
        },
    }

    m = result["machine"]
    print(f"model: {source}")
    print(f"machine: {m['processor']} ({m['logical_cpus']} logical CPUs) | {m['platform']} | "
          f"torch {m['torch']} | threads {m['torch_threads']}")
    print(f"images: {n} real Fashion-MNIST test images, batch size 1, warm-up {args.warmup}, interleaved")
    print(f"{'':14s}{'median ms':>10s}{'mean ms':>10s}{'p90 ms':>10s}")
    for name in names:
        s = latency[name]
        print(f"{name:14s}{s['median_ms']:10.3f}{s['mean_ms']:10.3f}{s['p90_ms']:10.3f}")
    sp = result["speedup"]
    print(f"speedup dense gated / sparse: {sp['dense_over_sparse_median']:.2f}x (median), "
          f"{sp['dense_over_sparse_mean']:.2f}x (mean)")
    print(f"speedup plain / sparse:       {sp['plain_over_sparse_median']:.2f}x (median), "
          f"{sp['plain_over_sparse_mean']:.2f}x (mean)")
    print(f"speedup plain BN-folded / sparse (skipping alone): {sp['plain_folded_over_sparse_median']:.2f}x (median)"
          f"{'' if sparse.scripted else '  [TorchScript unavailable: both ran as plain Python]'}")
    print(f"  the same two run as plain Python:                {sp['folded_eager_over_sparse_eager_median']:.2f}x "
          f"(median); compiling made the skipping net {sp['sparse_eager_over_sparse_median']:.2f}x faster")
    print(f"MACs: dense plain {flops['dense_backbone']:,}, dense gated {flops['dense_total']:,} "
          f"(ACMs {flops['dense_acm']:,}), executed mean {flops['executed_mean']:,.0f}")
    print(f"executed / dense: {flops['ratio_vs_plain']:.3f} of the plain network, "
          f"{flops['ratio_vs_dense_gated']:.3f} of the dense gated network "
          f"(active gates {result['active_fraction']:.3f})")
    print(f"accuracy: plain {accuracy['plain']:.4f}, dense gated {accuracy['dense_gated']:.4f}, "
          f"sparse {accuracy['sparse_gated']:.4f}")
    ag = result["agreement"]
    print(f"dense vs sparse: max |logit diff| {ag['max_abs_logit_diff']:.2e}, same prediction "
          f"{ag['same_prediction']:.4f}, identical paths {ag['identical_paths']:.4f}")
    print(f"compiled vs plain-Python core: logits bit for bit equal: {ag['compiled_equals_eager']}")
    if args.profile:
        result["profile_us_per_image"] = profile = {
            name: operator_times(runners[name], images) for name in ("sparse_gated", "plain_folded")}
        print("under torch.profiler, self CPU time per image (us), the costliest operators:")
        ops = sorted(set(profile["sparse_gated"]) | set(profile["plain_folded"]),
                     key=lambda op: -max(profile["sparse_gated"].get(op, 0), profile["plain_folded"].get(op, 0)))
        print(f"  {'operator':34s}{'sparse_gated':>14s}{'plain_folded':>14s}")
        for op in ops[:12]:
            print(f"  {op:34s}{profile['sparse_gated'].get(op, 0):14.0f}{profile['plain_folded'].get(op, 0):14.0f}")
        totals = [sum(profile[net].values()) for net in ("sparse_gated", "plain_folded")]
        print(f"  {'total':34s}{totals[0]:14.0f}{totals[1]:14.0f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
