"""Why the first convolution stays ungated (docs/method.md, "Backbones").

An ACM reads the global average of its layer's input.  For the first
convolution of a grey-image network that input is the image, so the ACM
would see one number per image: its mean brightness.  This measures how
much of the class that number carries (a logistic regression fitted on the
Fashion-MNIST training split, scored on the test split), beside the same
probe on the 64 global averages the second layer's ACM reads in a bundle.

    python scripts/first_layer_probe.py [--bundle runs/vgg7-base]
"""

from __future__ import annotations

import argparse
import json

import torch
from sklearn.linear_model import LogisticRegression

from pathguard.detector.bundle import load_bundle
from pathguard.detector.data import DataSpec, load_split, resolve_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="also probe what this bundle's first gated ACM reads")
    parser.add_argument("--n-train", type=int, default=20000)
    args = parser.parse_args()
    spec = resolve_spec(DataSpec("fashion-mnist"))
    train, test = load_split(spec, "train").head(args.n_train), load_split(spec, "test")
    result = {}
    x_train, x_test = train.images.mean(dim=(1, 2, 3))[:, None], test.images.mean(dim=(1, 2, 3))[:, None]
    probe = LogisticRegression(max_iter=1000).fit(x_train.numpy(), train.labels.numpy())
    result["image_mean_probe_test_accuracy"] = float(probe.score(x_test.numpy(), test.labels.numpy()))
    if args.bundle:
        model = load_bundle(args.bundle).decoupled
        with torch.no_grad():
            feats = [model.run_block(0, model.normalise(d.images)).output.mean(dim=(2, 3)) for d in (train, test)]
        probe = LogisticRegression(max_iter=2000).fit(feats[0].numpy(), train.labels.numpy())
        result["first_block_pooled_probe_test_accuracy"] = float(probe.score(feats[1].numpy(), test.labels.numpy()))
    result["images"] = {"train": len(train), "test": len(test)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
