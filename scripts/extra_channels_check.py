"""Would channels the shipped detector does not read catch what it lets
through: the rotated items, and the minimal attacks?  Validation split only.

Two candidate families, each added to the shipped detector's three channels
(``value:moments0``, ``confidence``, ``path``):

* **where the features are** (``gridG-bI``): every shipped channel averages
  its block over space, so an item rotated by 90 or 180 degrees keeps most
  of what they see (the natural set's rotated groups are the ones it flags
  least).  A class-conditional Gaussian (class means, one tied Ledoit-Wolf
  covariance, as detector v2's ``value`` channel) on block I's output
  average-pooled to a G x G grid, fitted on a seeded draw of clean training
  images with their true labels; the score is the squared Mahalanobis
  distance to the *predicted* class.
* **feature squeezing** (``squeeze-*``, Xu, Evans and Qi, NDSS 2018): the L1
  distance between the softmax of the image and of a squeezed copy (pixel
  depth reduced to B bits, ``bitB``: round(x (2^B - 1)) / (2^B - 1); or a
  2x2 median filter, ``median2``).  Minimal attacks (CW, DeepFool) stop just
  past the decision boundary, where a small squeeze undoes them.

Each channel's p-values are taken against one half of the validation
calibration split; the combined score's threshold (its 95% quantile) on the
other half.  FGSM, BIM, PGD, CW and DeepFool attack ``--n`` correctly
classified images of the validation ablation pool: AUROC and the share
flagged at that threshold; the natural groups (detector/natural.py) are
built from the same pool images: the share flagged
(``channel_validation.evaluate_candidate_sets``).

    python scripts/extra_channels_check.py [--n 400] [--json reports/detector-v2/extra-channels-check.json]
        [--attacks-cache runs/val-attacks]
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

GRIDS = ("grid2-b0", "grid4-b0", "grid4-b2", "grid2-b6")
SQUEEZES = ("squeeze-bit4", "squeeze-bit2", "squeeze-median2")
CANDIDATES = GRIDS + SQUEEZES
# (rule, shipped channels kept, candidates added)
SETS = (("min-p", SHIPPED, ()), *(("min-p", SHIPPED, (c,)) for c in CANDIDATES),
        ("min-p", SHIPPED, ("grid4-b2", "grid2-b6")), ("min-p", SHIPPED, ("grid4-b0", "grid2-b6")),
        ("min-p", SHIPPED, ("grid2-b0", "grid4-b2", "grid2-b6")), ("fisher", SHIPPED, ("squeeze-bit2",)),
        ("min-p", SHIPPED[:2], ()), ("min-p", SHIPPED[:2], ("squeeze-bit4",)))


def squeezed(images: torch.Tensor, name: str) -> torch.Tensor:
    kind = name.removeprefix("squeeze-")
    if kind.startswith("bit"):
        levels = 2 ** int(kind[3:]) - 1
        return torch.round(images * levels) / levels
    # a 2x2 median filter; of the window's four values torch.median takes the lower middle one
    padded = F.pad(images, (0, 1, 0, 1), mode="replicate")
    return F.unfold(padded, 2).median(1).values.view_as(images)


class GridFeatures:
    """Every candidate grid view and the predicted class, from one dense pass."""

    def __init__(self, model, grids=GRIDS) -> None:
        self.model, self.grids = model.eval(), [(g, int(g[4]), int(g.split("-b")[1])) for g in grids]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        rows: dict[str, list] = {}
        for start in range(0, len(images), 500):
            chunk = images[start:start + 500]
            trace = self.model.trace(chunk, keep_activations=True)
            for name, size, block in self.grids:
                rows.setdefault(name, []).append(F.adaptive_avg_pool2d(trace.activations[block], size).flatten(1))
            rows.setdefault("predicted", []).append(trace.logits.argmax(1))
            probs = trace.logits.softmax(1)
            for name in SQUEEZES:
                rows.setdefault(name, []).append((self.model(squeezed(chunk, name)).softmax(1) - probs).abs().sum(1))
        return {k: torch.cat(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="bundles/fmnist-default")
    parser.add_argument("--n", type=int, default=400, help="correctly classified validation pool images")
    parser.add_argument("--n-fit", type=int, default=20000, help="clean training images the Gaussians see")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--attacks-cache", default=None,
                        help="folder of the pool's attack sets: reused when provably this run's, else made and saved")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    fitted = fit_on_validation(args.bundle, SHIPPED, args.n, args.seed)
    features = GridFeatures(fitted.bundle.decoupled)
    train, _ = train_validation(fitted.bundle, data_spec(fitted.bundle))
    draw = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_fit]
    fit_rows = features(train.images[draw])
    gaussians = {g: ClassGaussian.fit(fit_rows[g], train.labels[draw], len(train.classes)) for g in GRIDS}

    def distances(images):
        """Every candidate's raw score (larger = more suspicious)."""
        rows = features(images)
        return {**{g: gaussians[g].distance(rows[g], rows["predicted"]).numpy() for g in GRIDS},
                **{q: rows[q].double().numpy() for q in SQUEEZES}}

    rows = evaluate_candidate_sets(fitted, distances, CANDIDATES, SETS, args.attacks_cache)
    result = {"bundle": str(fitted.bundle.path), "digest": fitted.bundle.digest, "seed": args.seed,
              "pool_images": len(fitted.pool), "fit_images": len(draw), "rows": rows}
    result["wall_seconds"] = time.time() - started
    write_json(args.json, result)


if __name__ == "__main__":
    main()
