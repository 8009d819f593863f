"""Which pass sizes give an image the same bits as a pass of 64, op by op.

The service computes every forward pass on at most ``forward_chunk`` images
(padded) so that an image's answer does not depend on what shares its batch
(pathguard.detector.inspection).  This check shows where a smaller pass can
keep the bits: for each of the shipped model's convolutions and small matrix
products (the architecture controlling modules, the head) at this machine's
torch build, it computes 48 random inputs in passes of n = 1..16 and says,
per n, whether every output is bit-identical to the same inputs in one pass
of 64 ("Y") or not (".").  On the project's 2-core x86-64 VM (torch 2.13
CPU, oneDNN and MKL) the convolutions agree for every n >= 2 but not n = 1,
and the 128-wide matrix products only from n = 6: the kernels pick their
algorithm by the batch's size.  Hence the inspector computes every matrix
product on at least ``forward_chunk`` rows (padded) and lets the rest of a
pass shrink to the smallest size it measures, where it runs, to give the
same bits as a full pass (``Inspector.pass_sizes``: here 2, so a lone image
pays a pass of 2, not 8).

    .venv/bin/python scripts/batch_invariance_check.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MAX_PASS = 16
ROWS = 48


def agreement(op, inputs: torch.Tensor, max_pass: int = MAX_PASS) -> str:
    """'Y' or '.' per pass size 1..max_pass: are the first ROWS outputs,
    computed in passes of that size, bit-identical to one pass over all?"""
    with torch.inference_mode():
        whole = op(inputs)[:ROWS]
        marks = []
        for n in range(1, max_pass + 1):
            parts = torch.cat([op(inputs[i:i + n]) for i in range(0, ROWS, n)])[:ROWS]
            marks.append("Y" if torch.equal(parts, whole) else ".")
    return "".join(marks)


def model_ops(model) -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    """(name, module, input shape without the batch) of every convolution
    and linear layer of ``model``, at the spatial size it sees."""
    ops, size = [], model.arch.image_size
    for index, block in enumerate(model.blocks):
        ops.append((f"block{index}.conv", block.conv, (block.conv.in_channels, size, size)))
        if block.control is not None:
            ops.append((f"block{index}.control.fc1", block.control.fc1, (block.control.fc1.in_features,)))
            ops.append((f"block{index}.control.fc2", block.control.fc2, (block.control.fc2.in_features,)))
        if model.pool_after[index]:
            size //= 2
    ops.append(("head", model.head, (model.head.in_features,)))
    return ops


def main(argv: list[str] | None = None) -> int:
    from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the service's workers use 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_bundle(args.bundle).decoupled.eval()
    print(f"torch {torch.__version__}, {args.threads} thread(s); pass size n = 1..{MAX_PASS} vs one pass of 64 "
          "(Y = bit-identical)")
    print(f"{'op':<22} {'shape':<16} " + "".join(str(n % 10) for n in range(1, MAX_PASS + 1)))
    rows = []
    for name, op, shape in model_ops(model):
        marks = agreement(op, torch.randn(64, *shape))
        rows.append({"op": name, "input_shape": list(shape), "identical": [m == "Y" for m in marks]})
        print(f"{name:<22} {'x'.join(map(str, shape)):<16} {marks}")
    always = [n for n in range(1, MAX_PASS + 1) if all(r["identical"][n - 1] for r in rows)]
    print(f"pass sizes at which every op agrees with a pass of 64: {always or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows,
                                               "agreeing_pass_sizes": always}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
