"""Does the *image itself* look like its predicted class?  Pixel-space
channels beside the shipped detector's, validation split only.

Every shipped channel reads the network (the first block's activations, the
confidence, the gate logits).  A rotated item, or an item a minimal attack
(CW, DeepFool) pushed just across a boundary, can still look unlike the
class it is now called in the pixels themselves.  Candidates, each fitted on
a seeded draw of clean training images with their true labels (pixels in
[0, 1], flattened), each scored against the *predicted* class where it has
one:

* ``pca{k}``: squared residual after projecting onto the top-k principal
  directions of all training images (no class: a plain reconstruction
  check);
* ``cpca{k}``: squared residual to the predicted class's mean and its own
  top-k principal directions (how far the image is from looking like that
  class);
* ``gauss{g}``: a class-conditional Gaussian (class means, one tied
  Ledoit-Wolf covariance, as detector v2's ``value`` channel) on the image
  average-pooled to g x g, squared Mahalanobis distance to the predicted
  class (where the item's mass is).

Each is scored alone and added to the shipped channels (``value:moments0``,
``confidence``, ``path``), combined by min-p, as ``scripts/extra_channels_check.py`` does
for its candidates (``channel_validation.evaluate_candidate_sets``: p-values
against one half of the calibration split, the threshold on the other half;
FGSM, BIM, PGD, CW and DeepFool on ``--n`` correctly classified pool images;
the natural groups built from the same images).

    python scripts/pixel_channels_check.py [--n 400] [--attacks-cache runs/val-attacks]
        [--json reports/detector-v2/pixel-channels-check.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pathguard.detector.provenance import ClassGaussian
from pathguard.jobs.data import data_spec, train_validation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channel_validation import SHIPPED, evaluate_candidate_sets, fit_on_validation, write_json  # noqa: E402

PCA = ("pca128",)
CLASS_PCA = ("cpca8", "cpca32")
POOLED = ("gauss7", "gauss14")
CANDIDATES = PCA + CLASS_PCA + POOLED
# (rule, shipped channels kept, candidates added)
SETS = (("min-p", SHIPPED, ()), *(("min-p", SHIPPED, (c,)) for c in CANDIDATES),
        ("min-p", SHIPPED, ("cpca32", "gauss14")), ("min-p", SHIPPED[:2], ("cpca32",)),
        *(("min-p", (), (c,)) for c in CANDIDATES))  # each candidate alone


class PixelChannels:
    """The candidates' models, fitted on clean images (N, 1, H, W) and labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        x = images.flatten(1).double()
        self.mean = x.mean(0)
        self.top = torch.linalg.svd(x - self.mean, full_matrices=False).Vh  # rows: principal directions
        self.class_mean, self.class_top = [], []
        for c in range(num_classes):
            xc = x[labels == c]
            self.class_mean.append(xc.mean(0))
            self.class_top.append(torch.linalg.svd(xc - self.class_mean[-1], full_matrices=False).Vh)
        self.gaussians = {g: ClassGaussian.fit(self.pooled(images, g), labels, num_classes) for g in POOLED}

    @staticmethod
    def pooled(images: torch.Tensor, name: str) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), int(name.removeprefix("gauss"))).flatten(1).double()

    @staticmethod
    def residual(d: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Squared norm of each row of ``d`` outside the span of ``directions``' rows."""
        return ((d - (d @ directions.T) @ directions) ** 2).sum(1)

    def __call__(self, images: torch.Tensor, predicted: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.flatten(1).double()
        out = {f"pca{k}": self.residual(x - self.mean, self.top[:k]) for k in (int(c[3:]) for c in PCA)}
        for name in CLASS_PCA:
            k, score = int(name[4:]), torch.zeros(len(x), dtype=torch.float64)
            for c in predicted.unique().tolist():
                rows = predicted == c
                score[rows] = self.residual(x[rows] - self.class_mean[c], self.class_top[c][:k])
            out[name] = score
        out.update({g: self.gaussians[g].distance(self.pooled(images, g), predicted) for g in POOLED})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/fmnist-default")
    parser.add_argument("--n", type=int, default=400, help="correctly classified validation pool images")
    parser.add_argument("--n-fit", type=int, default=20000, help="clean training images the models see")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--attacks-cache", default=None,
                        help="folder of the pool's attack sets: reused when provably this run's, else made and saved")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    fitted = fit_on_validation(args.bundle, SHIPPED, args.n, args.seed)
    model = fitted.bundle.decoupled.eval()
    train, _ = train_validation(fitted.bundle, data_spec(fitted.bundle))
    draw = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_fit]
    channels = PixelChannels(train.images[draw], train.labels[draw], len(train.classes))

    @torch.no_grad()
    def distances(images):
        """Every candidate's raw score (larger = more suspicious), against the model's answer."""
        predicted = torch.cat([model(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
        return {name: v.numpy() for name, v in channels(images, predicted).items()}

    rows = evaluate_candidate_sets(fitted, distances, CANDIDATES, SETS, args.attacks_cache)
    result = {"bundle": str(fitted.bundle.path), "digest": fitted.bundle.digest, "seed": args.seed,
              "pool_images": len(fitted.pool), "fit_images": len(draw), "rows": rows,
              "wall_seconds": time.time() - started}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
