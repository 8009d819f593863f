"""Per-image inspection: what ``pathguard.inspect`` and the service answer
for each image.

``Inspector`` couples a verified bundle with its fitted detector and turns a
batch of images (pixels in [0, 1], the model's input shape) into one
``Inspection`` per image.

**An image's answer does not depend on the other images of its batch.**
CPU convolutions and matrix products (oneDNN, MKL) pick their algorithm, and
with it the order in which they add, by the shape of the whole batch: the
same image scored alone and inside a batch of 64 differed in its float32
logits (up to ~5e-6) and in its score (up to ~5e-5), so near the threshold
a flag could depend on what else was sent.  ``inspect`` therefore runs the
forward pass and the scoring in chunks of ``chunk`` images (default
``DEFAULT_CHUNK``), the last one padded with black images; every computation
then has one shape, and an image's row is computed the same way wherever it
sits in the chunk and whatever shares it (tests/test_service_determinism.py
checks this bit for bit).  The padding costs at most ``chunk - 1`` images'
worth of compute per call (less with the smaller passes below).
``chunk=None`` runs the whole batch in one pass (the answers then depend,
in the last bits, on the batch's size).  The
images are also made contiguous (N, C, H, W) first: the convolutions also
choose their algorithm by the input's memory layout, so the same pixels in a
channels-last-strided tensor would otherwise be answered differently.

**Smaller passes for a few images, where they are proven to give the same
bits.**  A lone image padded to a pass of 8 pays eight images' compute.
On this machine's torch build only the small matrix products (the
architecture controlling modules, the head) change their bits below 6 rows
(``scripts/batch_invariance_check.py``), so the inspector's copy of the
model computes every ``nn.Linear`` on at least ``chunk`` rows (padded, a
few microseconds) and leaves the rest of the pass at its real size.  Which
smaller pass sizes then reproduce the pass of ``chunk`` bit for bit is not
assumed but measured where the inspector runs (``pass_sizes``): at the first
partial pass, ``chunk`` seeded probe images are answered in passes of every
size 1..chunk - 1 (each probe at two positions) and compared with one pass
of ``chunk`` in every figure of the answer; a size that differs in
any bit is never used.  Kernels choose their algorithm by the shapes (and
the thread count, which is part of the cache key), not by the values, so a
size that agrees on the probes computes every image the same way.  A partial
pass of n images then runs at the smallest verified size >= n
(``small_passes=False`` always pads to ``chunk``).

**Two forward engines** (``engine``; docs/method.md, "Inference engines").
``dense`` runs each pass through the model as above.  ``sparse`` (what
``auto`` picks on the CPU) runs every image alone through
``SparseGatedNet``, skipping its switched-off filters: its kernels' shapes
follow the image's own path, so the forward is batch-independent by
construction, and only the scoring still runs in passes (of the verified
sizes, padded with a black image's observation, computed once).  On the
shipped model a lone image's observation costs about a third of its dense
pass, and a pass of 8 the same per image (``bench/bench_engines.py``).  The engines' answers agree to float tolerance
(~1e-5), not bit for bit, so one deployment uses one engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .acceleration import SparseGatedNet
from .bundle import DEFAULT_BUNDLE, Bundle, load_bundle, load_detector
from .paths import PathBatch, split_layers
from .scores import PathScore

# Images per forward pass.  Small enough that one image alone is answered
# quickly (a lone image costs a pass over ``DEFAULT_CHUNK`` images), large
# enough that a big batch loses little to the per-pass overhead.
DEFAULT_CHUNK = 8
# Seeded probe images of the pass-size check (``Inspector.pass_sizes``).
PROBE_SEED = 20240917


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` rows (black images, for
    a batch of pixels)."""
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))]) if len(x) < rows else x


class RowPaddedLinear(nn.Module):
    """``linear`` computed on at least ``rows`` rows: fewer are padded with
    zero rows and the padding's outputs dropped, so the matrix product has
    one shape for every pass of up to ``rows`` images (module docstring).
    """

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        super().__init__()
        self.linear, self.rows = linear, rows

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(pad_rows(x, self.rows))[:len(x)]


def pad_linear_rows(model: nn.Module, rows: int) -> nn.Module:
    """A copy of ``model`` whose every ``nn.Linear`` is a ``RowPaddedLinear``."""
    padded = copy.deepcopy(model)
    for parent in list(padded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, RowPaddedLinear(child, rows))
    return padded


@dataclass
class Inspection:
    predicted_class: int
    label: str
    confidence: float
    adversarial: bool
    score: float
    threshold: float
    layer_deviations: list[float]
    active_fraction: float
    layer_paths: list[list[int]] | None = None
    # Which layer deviates and which class each gated layer's path points to
    # (PathScore.evidence): most_deviating, layer_classes (names), early_class
    # (the first gated layer's), p_values (per channel, or None).
    evidence: dict | None = None


ENGINES = ("auto", "sparse", "dense")


def resolve_engine(engine: str, model: nn.Module, detector: PathScore) -> str:
    """``auto``: the skipping forward (``sparse``) for a gated model on the
    CPU whose detector reads no full activations, else ``dense``.  Image by
    image, skipping switched-off filters, a CPU forward of the shipped vgg7
    takes about as long per image as the dense forward does in passes of
    8, and a lone image about a third of its padded pass (docs/method.md,
    "Inference engines"); on a GPU one dense pass of many images is the
    fast way."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    sparse_ok = getattr(model, "gated", False) and "activations" not in detector.requires
    if engine == "sparse" and not sparse_ok:
        raise ValueError("the sparse engine needs a gated model and a detector that reads no full activations "
                         f"({detector.name} requires {sorted(detector.requires)})")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if engine == "sparse" and not on_cpu:
        raise ValueError("the sparse engine runs on the CPU (one image per kernel launch would waste a GPU); "
                         "use engine='dense' or 'auto' there")
    if engine == "auto":
        return "sparse" if sparse_ok and on_cpu else "dense"
    return engine


class Inspector:
    def __init__(self, bundle: Bundle, detector: PathScore, chunk: int | None = DEFAULT_CHUNK,
                 small_passes: bool = True, engine: str = "auto") -> None:
        if detector.threshold_ is None:
            raise ValueError("the bundle's detector has no threshold; run `pathguard fit`")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, not {chunk}")
        self.bundle = bundle
        self.detector = detector
        self.chunk = chunk
        self.small_passes = bool(small_passes and chunk is not None and chunk > 1)
        model = bundle.decoupled.eval()
        self.engine = resolve_engine(engine, model, detector)
        if self.engine == "sparse":
            # Every image alone through the skipping forward: its kernels' shapes follow its own
            # path only, so the forward never depends on the batch; the scoring still runs in
            # passes of `chunk` rows (padded with a black image's observation).
            self.sparse = SparseGatedNet(model)
            self.model = model
            # the blocks whose readings the sparse pass computes: the detector's (True = every block)
            read = detector.blocks_read() if "blocks" in detector.requires else frozenset()
            self.blocks_read = True if read is None else read
        else:
            self.sparse = None
            # the matrix products on at least `chunk` rows in every pass (module docstring)
            self.model = pad_linear_rows(model, chunk).eval() if self.small_passes else model
        self._blank: PathBatch | None = None
        self._pass_sizes: dict[tuple, list[int]] = {}

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BUNDLE, chunk: int | None = DEFAULT_CHUNK,
             small_passes: bool = True, engine: str = "auto") -> "Inspector":
        bundle = load_bundle(path)
        return cls(bundle, load_detector(bundle), chunk=chunk, small_passes=small_passes, engine=engine)

    def observe(self, images: torch.Tensor, rows: int) -> PathBatch:
        """What the detector reads of one pass over ``images`` (the rows past
        ``rows`` are padding: black images)."""
        if self.sparse is None:
            return self.detector.observe(self.model, images, batch_size=len(images))
        # only the blocks the detector reads (Detector.blocks_read): each block read costs its spatial
        # moments and keeps its ReLU before the max-pool (bench/bench_engines.py)
        blocks = self.blocks_read
        batch = self.sparse.observe(images[:rows], blocks=blocks)
        if rows == len(images):
            return batch
        if self._blank is None:  # a black image's observation, computed once
            self._blank = self.sparse.observe(images.new_zeros((1, *images.shape[1:])), blocks=blocks)
        return PathBatch.concat([batch, self._blank.subset([0] * (len(images) - rows))])

    def pass_sizes(self) -> list[int]:
        """The pass sizes this inspector uses, ascending, ``chunk`` last:
        those smaller than ``chunk`` that answer every probe image bit for bit
        as a pass of ``chunk`` does, on this device and thread count
        (measured once per both; module docstring)."""
        if self.chunk is None:
            return []
        if not self.small_passes:
            return [self.chunk]
        key = (str(next(self.model.parameters()).device), torch.get_num_threads())
        if key not in self._pass_sizes:
            self._pass_sizes[key] = self._verify_pass_sizes()
        return self._pass_sizes[key]

    @torch.inference_mode()
    def _verify_pass_sizes(self) -> list[int]:
        chunk = self.chunk
        generator = torch.Generator().manual_seed(PROBE_SEED)
        probes = torch.rand((chunk, *self.input_shape), generator=generator)
        # half of them smooth (blurred noise), closer to images than white noise is
        half = chunk // 2
        probes[half:] = torch.nn.functional.avg_pool2d(probes[half:], 5, stride=1, padding=2,
                                                       count_include_pad=False)
        probes = probes.to(next(self.model.parameters()).device)
        reference = [_figures(a) for a in self._inspect_chunk(probes, chunk, True)]
        sizes = []
        for size in range(1, chunk):
            answers = []
            # every probe answered in a pass of `size`, the padded last one included,
            # at two different positions (offset 0 and a shifted grouping)
            for offset in sorted({0, size // 2}):
                order = torch.roll(torch.arange(len(probes)), -offset)
                got = [None] * len(probes)
                for start in range(0, len(probes), size):
                    rows = order[start:start + size]
                    part = pad_rows(probes[rows], size)
                    for row, answer in zip(rows.tolist(), self._inspect_chunk(part, len(rows), True)):
                        got[row] = _figures(answer)
                answers.append(got)
            if all(got == reference for got in answers):
                sizes.append(size)
        return sizes + [chunk]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.bundle.input_shape

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("pixel values must be finite and in [0, 1]")

    @torch.inference_mode()
    def inspect(self, images: torch.Tensor, include_path: bool = False) -> list[Inspection]:
        """One ``Inspection`` per image, in order (see the module's docstring
        on chunks)."""
        self.check_images(images)
        # One memory layout too: oneDNN picks its algorithm by the input's
        # strides as well (a channels-last-strided batch is computed another
        # way, and its answers differ in the last bits).
        images = images.float()
        n, c, h, w = images.shape
        if images.stride() != (c * h * w, h * w, w, 1):  # (a 1-channel tensor can pass is_contiguous())
            images = images.clone(memory_format=torch.contiguous_format)
        if n == 0:
            return []
        size = self.chunk or n
        out: list[Inspection] = []
        for start in range(0, n, size):
            part = images[start:start + size]
            rows = len(part)
            if rows < size:  # pad with black images to a pass size of the same bits
                part = pad_rows(part, min(s for s in self.pass_sizes() if s >= rows))
            out += self._inspect_chunk(part, rows, include_path)
        return out

    def _inspect_chunk(self, images: torch.Tensor, rows: int, include_path: bool) -> list[Inspection]:
        """The first ``rows`` answers of one pass over ``images``."""
        batch = self.observe(images, rows)
        # on the whole chunk: one shape for every computation (module docstring)
        scores, evidence = self.detector.score_and_evidence(batch)
        scores = np.asarray(scores, dtype=np.float64)
        evidence = evidence[:rows]
        flags = self.detector.flag(scores)
        deviations = np.asarray(self.detector.layer_deviations(batch))
        probs = torch.softmax(batch.logits, dim=1)
        confidence, predicted = probs.max(dim=1)
        active = batch.paths.float().mean(dim=1)
        layers = split_layers(batch.paths[:rows].to(torch.int64), batch.widths) if include_path else None
        threshold = float(self.detector.threshold_)
        classes = self.bundle.classes
        for item in evidence:
            item["layer_classes"] = [classes[c] for c in item["layer_classes"]]
            item["early_class"] = item["layer_classes"][0] if item["layer_classes"] else None
        predicted_ = predicted[:rows].tolist()
        confidence_ = confidence[:rows].tolist()
        scores_ = scores[:rows].tolist()
        flags_ = flags[:rows].tolist()
        deviations_ = deviations[:rows].tolist()
        active_ = active[:rows].tolist()
        paths_ = [layer.tolist() for layer in layers] if layers is not None else None
        return [Inspection(
            predicted_class=c, label=classes[c], confidence=confidence_[i], adversarial=bool(flags_[i]),
            score=scores_[i], threshold=threshold, layer_deviations=deviations_[i], active_fraction=active_[i],
            layer_paths=[layer[i] for layer in paths_] if paths_ is not None else None, evidence=evidence[i],
        ) for i, c in enumerate(predicted_)]


def _figures(answer: Inspection) -> tuple:
    """Every figure of an answer, for the bit-for-bit comparison of pass sizes."""
    evidence = answer.evidence or {}
    p_values = evidence.get("p_values") or {}
    return (answer.predicted_class, answer.confidence, answer.adversarial, answer.score,
            tuple(answer.layer_deviations), answer.active_fraction,
            tuple(tuple(layer) for layer in answer.layer_paths or ()),
            evidence.get("most_deviating"), tuple(evidence.get("layer_classes") or ()),
            tuple(sorted(p_values.items())))
