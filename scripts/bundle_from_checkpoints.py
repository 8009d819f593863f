"""Write a bundle from the best checkpoints of a `pathguard train` run that
stopped before writing it (time limit, lost machine), and measure its card.

A training run keeps its best-so-far weights beside the output folder
(`.<name>.checkpoints/`: decoupled.safetensors and plain_reference.safetensors,
each with the epoch it was taken at) and prints one line per epoch.  This
script rebuilds the run's configuration (a variant of scripts/model_search.py),
its data and split, reads the per-epoch history back from the log, and
writes the bundle exactly as `pathguard train` would have, with the same
card measured here (on a CPU unless --device says otherwise).

    python scripts/bundle_from_checkpoints.py --variant base \\
        --decoupled runs/gpu-search/base-decoupled.safetensors \\
        --plain runs/gpu-search/base-plainref.safetensors \\
        --log runs/gpu-search/base.log --output runs/vgg7-base
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_search import BASE, VARIANTS  # noqa: E402

from pathguard.detector.artifacts import load_tensors  # noqa: E402
from pathguard.detector.models import ConvNet, architecture_for  # noqa: E402
from pathguard.jobs import train  # noqa: E402

LINE = re.compile(r"^\[(?P<stage>[\w-]+)\] epoch (?P<epoch>\d+): (?P<fields>.*)$")
STAGES = {"plain": "plain", "decoupled": "decoupled", "plain-ref": "plain_reference"}


def read_history(log: Path) -> dict[str, list[dict]]:
    """Per stage, the epoch records a training log printed."""
    history: dict[str, list[dict]] = {name: [] for name in STAGES.values()}
    for line in log.read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        record = {"epoch": int(match["epoch"])}
        for field in match["fields"].split(", "):
            key, value = field.split("=")
            record[key] = float(value)
        history[STAGES[match["stage"]]].append(record)
    return history


def checkpoint_epoch(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["epoch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, choices=list(VARIANTS))
    parser.add_argument("--decoupled", required=True, type=Path)
    parser.add_argument("--plain", required=True, type=Path, help="the plain reference's checkpoint")
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu", help="where the card is measured")
    parser.add_argument("--trained-on", default="one NVIDIA H100 (four variants side by side)")
    parser.add_argument("--precision", default="fp32", choices=train.PRECISIONS,
                        help="the run's training arithmetic (model_search.py --precision), for training.json")
    args = parser.parse_args()
    started = time.time()
    cfg = train.Config(**{**BASE, **VARIANTS[args.variant], "output": args.output, "force": True,
                          "device": args.device, "precision": args.precision})
    data = train._load_data(cfg)
    c, h, _ = data.train.shape
    norm = data.record["normalisation"]
    arch = architecture_for(cfg.architecture, c, h, len(data.classes), norm["mean"], norm["std"])
    history = read_history(args.log)
    stages = []
    for name, gated, path in (("plain", False, None), ("decoupled", True, args.decoupled),
                              ("plain_reference", False, args.plain)):
        model = ConvNet(arch, gated=gated)
        state = load_tensors(path) if path else None
        best = checkpoint_epoch(path) if path else max(history[name], key=lambda r: r["val_accuracy"])["epoch"]
        stages.append(SimpleNamespace(model=model, best_state=state, history=history[name], best_epoch=best))
    seconds = sum(r["seconds"] for records in history.values() for r in records)
    extra = {"trained_on": args.trained_on, "wall_seconds_meaning": "sum of the epochs' seconds in the log",
             "assembled_from_checkpoints": {"decoupled": str(args.decoupled), "plain_reference": str(args.plain),
                                            "log": str(args.log), "card_measured_on": args.device}}
    path = train._write(cfg, arch, data, tuple(stages), None, seconds, extra)
    print(f"assembled in {time.time() - started:.0f} s")
    print(f"bundle written to {path}")


if __name__ == "__main__":
    main()
