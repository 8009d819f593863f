"""Natural out-of-distribution images (issue 11, item 3).

Inputs that plainly do not belong to the training distribution, built from
clean test images (N, C, H, W, pixels in [0, 1]) or from nothing:

| group | image | from the test images |
|---|---|---|
| ``blank-black`` / ``blank-grey`` / ``blank-white`` | every pixel 0 / 0.5 / 1 | no |
| ``inverted`` | 1 - x | yes |
| ``white-background`` | the item as it is, every background pixel (value <= ``background_level``) set to 1 | yes |
| ``uniform-noise`` | every pixel i.i.d. U[0, 1) | no |
| ``gaussian-noise`` | every pixel i.i.d. N(``gaussian_mean``, ``gaussian_std``^2), clipped to [0, 1] | no |
| ``rotated-<a>`` | x rotated by a degrees counter-clockwise | yes |

``white-background``: Fashion-MNIST items are light on a black background
(the dataset negated its product photos).  A product photographed on white
and converted to grey keeps a white background; this group puts the item,
with its Fashion-MNIST intensities, on such a background: pixels at or
below ``background_level`` (0.1 by default, which also whitens the faint
anti-aliased rim) become 1, the item's pixels are kept.  (The fully
un-negated photo is 1 - x, the ``inverted`` group.)

Rotations by multiples of 90 degrees use ``torch.rot90`` (exact; square
images only); other angles sample bilinearly (``grid_sample``), the area
outside the rotated image filled with 0, the dataset's background.

Every group has as many images as the source draw (``n``, or all the
images given); blank groups repeat one image.  ``natural_ood`` is seeded:
the draw of source images and both noise groups come from one
``torch.Generator`` seeded with ``seed``, in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BLANKS = {"blank-black": 0.0, "blank-grey": 0.5, "blank-white": 1.0}


@dataclass
class NaturalSet:
    """Named groups of natural out-of-distribution images, with where each
    came from (``provenance``: the transformation in words and its
    parameters) and which rows of the given images were drawn
    (``source_indices``)."""

    groups: dict[str, torch.Tensor]
    provenance: dict[str, dict]
    seed: int
    source_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.groups[name]

    def __len__(self) -> int:
        return len(self.groups)

    def items(self):
        return self.groups.items()

    def to_json(self) -> dict:
        """Everything but the pixels, for a report."""
        return {"seed": self.seed, "source_indices": self.source_indices.tolist(),
                "groups": {name: {**self.provenance[name], "images": len(images), "shape": list(images.shape[1:])}
                           for name, images in self.groups.items()}}


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``images`` (N, C, H, W) rotated counter-clockwise by ``degrees``:
    ``torch.rot90`` for multiples of 90 (square images for odd multiples),
    else bilinear sampling with 0 outside the image."""
    quarter = degrees / 90.0
    if float(quarter).is_integer():
        k = int(quarter) % 4
        if k % 2 and images.shape[2] != images.shape[3]:
            raise ValueError(f"a {degrees} degree rotation needs square images, got {tuple(images.shape[2:])}")
        return torch.rot90(images, k, dims=(2, 3))
    a = math.radians(degrees)
    h, w = images.shape[2], images.shape[3]
    # affine_grid maps output to input positions in normalised (x right, y down) coordinates;
    # the aspect factors keep the rotation rigid on non-square images.
    theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0],
                          [math.sin(a) * w / h, math.cos(a), 0.0]], dtype=images.dtype, device=images.device)
    grid = torch.nn.functional.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def white_background(images: torch.Tensor, background_level: float = 0.1) -> torch.Tensor:
    """Light-on-dark items on white: pixels <= ``background_level`` become 1."""
    return torch.where(images > background_level, images, torch.ones_like(images))


def _check_images(images: torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError("images must be float pixels in [0, 1]")
    return images.detach().cpu().float()


def natural_ood(images: torch.Tensor, seed: int = 0, n: int | None = None, angles: tuple = (90, 180),
                background_level: float = 0.1, gaussian_mean: float = 0.5, gaussian_std: float = 0.5) -> NaturalSet:
    """The natural out-of-distribution groups of the module docstring, built
    from ``n`` clean test images drawn with ``seed`` (all of them, in their
    order, when ``n`` is None); float32 on the CPU, pixels in [0, 1]."""
    images = _check_images(images)
    if n is not None and not 0 < n <= len(images):
        raise ValueError(f"n must be in 1..{len(images)}, got {n}")
    if gaussian_std < 0 or not 0 <= background_level < 1:
        raise ValueError("need gaussian_std >= 0 and 0 <= background_level < 1")
    gen = torch.Generator().manual_seed(seed)
    index = torch.arange(len(images)) if n is None else torch.randperm(len(images), generator=gen)[:n].sort().values
    source = images[index]
    shape = source.shape
    groups = {name: torch.full(shape, value) for name, value in BLANKS.items()}
    provenance = {name: {"transformation": f"every pixel {value}", "from_test_images": False}
                  for name, value in BLANKS.items()}
    groups["inverted"] = 1.0 - source
    provenance["inverted"] = {"transformation": "1 - x", "from_test_images": True}
    groups["white-background"] = white_background(source, background_level)
    provenance["white-background"] = {"transformation": "pixels <= background_level set to 1, the item kept",
                                      "background_level": background_level, "from_test_images": True}
    groups["uniform-noise"] = torch.rand(shape, generator=gen)
    provenance["uniform-noise"] = {"transformation": "i.i.d. U[0, 1) per pixel", "from_test_images": False}
    gaussian = gaussian_mean + gaussian_std * torch.randn(shape, generator=gen)
    groups["gaussian-noise"] = gaussian.clamp(0.0, 1.0)
    provenance["gaussian-noise"] = {"transformation": "i.i.d. N(mean, std^2) per pixel, clipped to [0, 1]",
                                    "mean": gaussian_mean, "std": gaussian_std, "from_test_images": False}
    for degrees in angles:
        name = f"rotated-{degrees:g}"
        groups[name] = rotate(source, degrees).clamp(0.0, 1.0)
        provenance[name] = {"transformation": f"rotated {degrees:g} degrees counter-clockwise",
                            "method": "torch.rot90" if float(degrees / 90).is_integer() else "bilinear, 0 outside",
                            "from_test_images": True}
    return NaturalSet(groups, provenance, seed, index)
