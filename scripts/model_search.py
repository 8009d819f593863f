"""Train candidate decoupled models side by side and pick one on validation.

Issue 10's search for a model whose paths carry the class: each variant is
a `pathguard train` configuration (pathguard/jobs/train.py), trained in its
own process (all at once: on a GPU the small networks leave the card mostly
idle, so parallel runs cost little more than one).  Every figure a choice
rests on is measured on the validation split; the test figures are reported
beside them and never used.  The chosen variant is then fitted
(`pathguard fit`) and, with --evaluate, run through `pathguard evaluate`.

    python scripts/model_search.py --out runs/search            # all variants
    python scripts/model_search.py --out /tmp/s --smoke          # a CPU smoke run

Output: <out>/<variant>/ (bundles), <out>/<variant>.log, <out>/summary.json
and summary.md (the table of targets per variant), <out>/<variant>.parity.json
(each fitted bundle's scores on 512 test images on this machine's device, to
compare with a CPU run of the same bundle), and with --evaluate
<out>/<chosen>.report/.  --export DIR packs each bundle as soon as it exists
(without its detector profile, which travels in <chosen>.detector.tgz), or,
for a run stopped before writing its bundle, its best checkpoints
(scripts/bundle_from_checkpoints.py turns them into a bundle).
--train-timeout stops unfinished runs with Ctrl-C (a run then writes its
bundle from its best checkpoints); --total-timeout bounds the rest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tarfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from pathguard.detector.bundle import load_bundle, load_detector
from pathguard.detector.data import load_split
from pathguard.detector.devices import resolve_device
from pathguard.jobs import evaluate, fit, train

# The recipe every variant starts from (docs/method.md, "Training recipe").
BASE = dict(architecture="vgg7", epochs_plain=10, epochs_decoupled=15, lambda_m=0.5, target_ratio=0.45,
            max_active_ratio=0.5, distill_weight=1.0, distill_temperature=4.0, progress=False)
VARIANTS: dict[str, dict] = {
    # The paper's terms with distillation: the path-class term on the training gate.
    "base": {},
    # The early layers pushed harder towards the class, on the bits inference uses.
    "front": dict(mi_front_weight=3.0, mi_hard_bits=True),
    # ...and the last epochs with exactly binary gates, as at inference.
    "front-hard": dict(mi_front_weight=3.0, mi_hard_bits=True, noise_schedule="linear-hard"),
    # The same recipe at half the width (a quarter of the MACs).
    "slim-front": dict(architecture="vgg7-slim", mi_front_weight=3.0, mi_hard_bits=True),
}
# Enough data that fit finds its 250 calibration images; minutes on a CPU.
DETECTOR_FILES = ("profile.json", "profile.safetensors")
SMOKE = dict(limit_train=6000, limit_test=500, epochs_plain=1, epochs_decoupled=1, architecture="vgg7-slim",
             val_fraction=0.25, max_active_ratio=1.0)

# Issue 10's targets, judged on the validation split for the choice.
TARGETS = {
    "accuracy >= 93.0%": lambda f: f["decoupled_accuracy"] >= 0.930,
    "gap <= 0.5 point": lambda f: f["gap_points"] <= 0.5,
    "last-layer probe >= 85%": lambda f: f["probe"][-2] >= 0.85,
    "every-layer probe >= 50%": lambda f: min(f["probe"][:-1]) >= 0.50,
    "active gates <= 0.50": lambda f: f["active_ratio"] <= 0.50,
    "executed MACs <= 45%": lambda f: f["mac_fraction"] <= 0.45,
}


def _train_one(name: str, options: dict, out: str, threads: int) -> None:
    """One variant in its own (spawned) process; ``options`` are complete,
    since a spawned process re-imports this module with its defaults.
    ``threads``: the CPU cores it may use (the card's probes run on the CPU,
    and parallel runs each using every core slow down one another)."""
    log = open(Path(out) / f"{name}.log", "w", buffering=1)
    sys.stdout = sys.stderr = log
    torch.set_num_threads(threads)
    try:
        train.run(train.Config(**options))
    except BaseException:  # the log says why; the search goes on with the others
        traceback.print_exc()
        raise



def figures(bundle_dir: Path, split: str) -> dict:
    """The targets' inputs from a bundle's card, on ``split``."""
    card = json.loads((bundle_dir / "model_card.json").read_text())
    quality = card["path_quality"]["probe"]["accuracy"][split]
    history = json.loads((bundle_dir / "training.json").read_text())
    if split == "validation":
        part = card["validation"]
        active, macs = part["active_fraction"], part["mac_ratio_vs_plain"]
    else:
        part = card["test"]
        active, macs = part["active_fraction"]["mean"], part["flops"]["ratio_vs_plain"]
    acc, plain = part["decoupled_accuracy"], part["plain_accuracy"]
    return {"decoupled_accuracy": acc, "plain_accuracy": plain, "gap_points": 100 * (plain - acc),
            "probe": quality, "active_ratio": active, "mac_fraction": macs,
            "train_seconds": history["wall_seconds"], "path_class_term": card.get("path_class_term_end")}


def summarise(out: Path, names: list[str]) -> dict:
    rows = {}
    for name in names:
        if not (out / name / "model_card.json").is_file():
            rows[name] = {"error": f"no bundle: see {name}.log"}
            continue
        val, test = figures(out / name, "validation"), figures(out / name, "test")
        met = [t for t, ok in TARGETS.items() if ok(val)]
        rows[name] = {"validation": val, "test": test, "targets_met_on_validation": met,
                      "overrides": VARIANTS.get(name, {})}
    done = {n: r for n, r in rows.items() if "error" not in r}
    # Most targets met; then validation accuracy plus mean probe accuracy.
    chosen = max(done, key=lambda n: (len(done[n]["targets_met_on_validation"]),
                                      done[n]["validation"]["decoupled_accuracy"]
                                      + sum(done[n]["validation"]["probe"][:-1])
                                      / len(done[n]["validation"]["probe"][:-1]))) if done else None
    summary = {"base": BASE, "variants": rows, "chosen": chosen,
               "rule": "most targets met on validation, then validation accuracy + mean layer probe"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    lines = ["| variant | split | accuracy | plain | gap | probe per layer (whole) | active | MACs | targets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["variants"].items():
        if "error" in row:
            lines.append(f"| {name} | - | {row['error']} | | | | | | |")
            continue
        for split in ("validation", "test"):
            f = row[split]
            probe = ", ".join(f"{p:.2f}" for p in f["probe"][:-1]) + f" ({f['probe'][-1]:.2f})"
            met = len(row["targets_met_on_validation"]) if split == "validation" else ""
            lines.append(f"| {name} | {split} | {100 * f['decoupled_accuracy']:.2f} | {100 * f['plain_accuracy']:.2f}"
                         f" | {f['gap_points']:.2f} | {probe} | {f['active_ratio']:.3f} | {f['mac_fraction']:.3f}"
                         f" | {met} |")
    lines.append(f"\nchosen: **{summary['chosen']}** ({summary['rule']})")
    return "\n".join(lines) + "\n"


def parity_record(bundle_dir: Path, device: str, n: int = 512) -> dict:
    """Scores, flags and predictions of the first ``n`` test images on this
    machine's device, to be compared with a CPU run of the same bundle."""
    bundle = load_bundle(bundle_dir).to(resolve_device(device))
    detector = load_detector(bundle)
    test = load_split(bundle.data_spec, "test").head(n)
    batch = detector.observe(bundle.decoupled, test.images)
    return {"device": str(resolve_device(device)), "torch": torch.__version__, "images": n,
            "digest": bundle.digest, "scores": detector.score_samples(batch).tolist(),
            "flags": detector.predict(batch).tolist(), "predictions": batch.predictions.tolist(),
            "gate_logits_abs_min": float(batch.gate_logits.abs().min())}


def export(out: Path, name: str, export_dir: str | None, members: list[str], skip: tuple = ()) -> None:
    """Pack ``members`` of ``out`` into <export_dir>/<name>.tgz, leaving out
    files named in ``skip``; atomically: a run stopped at its time limit
    leaves the last complete archive."""
    if not export_dir:
        return
    present = [m for m in members if (out / m).exists()]
    tmp = out / f".{name}.tgz"
    with tarfile.open(tmp, "w:gz") as tar:
        for member in present:
            tar.add(out / member, arcname=member,
                    filter=lambda info: None if Path(info.name).name in skip else info)
    shutil.move(tmp, Path(export_dir) / f"{name}.tgz")


def _finish_one(name: str, out: str, args: dict) -> None:
    """Fit the variant's detector, record its device scores, evaluate it."""
    out = Path(out)
    log = open(out / f"{name}.finish.log", "w", buffering=1)
    sys.stdout = sys.stderr = log
    bundle = out / name
    fit_cfg = fit.Config(bundle=str(bundle), device=args["device"], progress=False)
    if args["smoke"]:
        fit_cfg = replace(fit_cfg, n_ablation=20, limit_train=300)
    fit.run(fit_cfg)
    (out / f"{name}.parity.json").write_text(json.dumps(parity_record(bundle, args["device"]), indent=1))
    # The detector's profile (a precision matrix over every gate) travels
    # apart from the weights, so that each archive stays small.
    export(out, name, args["export"], [name, f"{name}.parity.json"], skip=DETECTOR_FILES)
    export(out, f"{name}.detector", args["export"] if name == args["chosen"] else None,
           [f"{name}/{f}" for f in DETECTOR_FILES])
    if args["evaluate"] and name == args["chosen"]:
        eval_cfg = evaluate.Config(bundle=str(bundle), device=args["device"], output=str(out / f"{name}.report"),
                                   n=args["evaluate_n"], attacks=tuple(args["evaluate_attacks"]), progress=False,
                                   quick=args["smoke"])
        evaluate.run(eval_cfg)
        export(out, name, args["export"], [name, f"{name}.parity.json", f"{name}.report"], skip=DETECTOR_FILES)


def _run_all(ctx, target, jobs: dict[str, tuple], deadline: float | None, grace: float = 0.0) -> None:
    """Run every job in its own process; at ``deadline`` each one still
    running gets Ctrl-C (train then writes its bundle from the best
    checkpoint so far, marked interrupted) and ``grace`` seconds to finish."""
    procs = {n: ctx.Process(target=target, args=a) for n, a in jobs.items()}
    for p in procs.values():
        p.start()
    for name, p in procs.items():
        p.join(None if deadline is None else max(deadline - time.time(), 1))
        if p.is_alive():
            os.kill(p.pid, signal.SIGINT)
            print(f"{name}: interrupted at the time limit", flush=True)
    for name, p in procs.items():
        p.join(grace)
        if p.is_alive():
            p.terminate()
            print(f"{name}: stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/search")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=train.PRECISIONS,
                        help="training arithmetic (pathguard train --precision): bf16 runs a CPU's training "
                             "step 1.7-1.9x faster where it has AMX or AVX512-BF16")
    parser.add_argument("--smoke", action="store_true", help="tiny data and epochs (checks the plumbing)")
    parser.add_argument("--train-timeout", type=float, default=None, help="seconds before unfinished runs stop")
    parser.add_argument("--total-timeout", type=float, default=None, help="seconds before fit/evaluate stop")
    parser.add_argument("--evaluate", action="store_true", help="also run pathguard evaluate on each variant")
    parser.add_argument("--evaluate-n", type=int, default=2000)
    parser.add_argument("--evaluate-attacks", nargs="+", default=list(evaluate.ALL_ATTACKS))
    parser.add_argument("--export", default=None, help="folder to copy one archive per variant into")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {**BASE, **(SMOKE if args.smoke else {})}
    started = time.time()
    ctx = mp.get_context("spawn")
    options = {n: {**base, **{k: v for k, v in VARIANTS[n].items() if not (args.smoke and k == "architecture")},
                   "output": str(out / n), "force": True, "device": args.device, "precision": args.precision}
               for n in args.variants}
    threads = max(1, (os.cpu_count() or 1) // len(args.variants))
    _run_all(ctx, _train_one, {n: (n, options[n], str(out), threads) for n in args.variants},
             None if args.train_timeout is None else started + args.train_timeout, grace=120)
    print(f"training: {time.time() - started:.0f} s", flush=True)
    summary = summarise(out, args.variants)
    print((out / "summary.md").read_text(), flush=True)
    logs = [p.name for p in out.glob("*.log")] + ["summary.json", "summary.md"]
    export(out, "search", args.export, logs)
    for name in args.variants:
        # The weights first (fitting may run out of time); a run stopped
        # before its bundle was written leaves its best checkpoints, which
        # scripts/bundle_from_checkpoints.py turns into a bundle.
        if "error" not in summary["variants"][name]:
            export(out, name, args.export, [name], skip=DETECTOR_FILES)
        else:
            export(out, name, args.export, [f".{name}.checkpoints/decoupled.safetensors",
                                            f".{name}.checkpoints/plain_reference.safetensors"])
    finished = [n for n in args.variants if "error" not in summary["variants"][n]]
    jobs_args = {**vars(args), "chosen": summary["chosen"]}
    _run_all(ctx, _finish_one, {n: (n, str(out), jobs_args) for n in finished},
             None if args.total_timeout is None else started + args.total_timeout, grace=5)
    print(f"fit, parity, evaluate: {time.time() - started:.0f} s", flush=True)
    export(out, "search", args.export, [p.name for p in out.glob("*.log")] + ["summary.json", "summary.md"])


if __name__ == "__main__":
    main()
