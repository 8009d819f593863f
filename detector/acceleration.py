"""Real acceleration from the calculation path: FLOP accounting and a
batch-1 inference mode that actually skips switched-off filters.

Decoupling (docs/method.md, "Decoupled network") promises that an input
only needs the filters on its calculation path.  This module measures that promise twice:

* **On paper** -- ``dense_flops`` counts what the network costs when every
  filter runs; ``executed_flops`` counts, per image, what a gated forward
  really needs once switched-off filters are skipped.
* **On the clock** -- ``SparseGatedNet`` runs one image at a time and calls
  the convolutions with weights sliced to the active output filters (rows)
  and the active input channels (columns), so the arithmetic really shrinks.
  Its logits equal the dense gated model's in eval mode to float tolerance
  and its path is identical.

What is counted
---------------
All counts are **multiply-accumulates (MACs)**, one per product-and-add, as
in most pruning papers (FLOPs in the "2 x MACs" sense are twice these).
Counted: every 3x3 convolution (H * W * C_out * C_in * 9, stride 1,
padding 1, so H x W is the layer's input size), both Linear layers of every
architecture controlling module (C_in * C_in/4 + C_in/4 * C_out) and the
classification head (C_last * num_classes).  Not counted, because they are
element-wise and small next to the convolutions: bias additions, BatchNorm
(folded into the convolution at inference), ReLU, the gate multiplication,
max-pooling, global average pooling (of the head and of the ACMs) and the
input normalisation.

Skipping rule (``executed_flops``): a switched-off filter of gated layer l
saves its own output channel (its share of conv l, BN and ReLU) *and* its
column of the next convolution, which only needs to read active input
channels; after the last convolution the head only needs the columns of
active channels.  ReLU zeros inside an active channel are not exploited.
The ACMs are counted in full (in the dense model their MLP reads the
full-width pooled vector, zeros included; ``SparseGatedNet`` reads only the
active channels' rows of the first layer, so there the count is an upper
bound): they are the price of gating and are added to the executed count.
The first convolution is ungated and always runs in full.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .models import SPREAD_EPS, ConvNet, max_pool_2x2
from .paths import PathBatch, observe, split_layers

KERNEL = 9  # 3 x 3 convolutions throughout (models.ConvBlock)


# ------------------------------------------------------------ geometry


@dataclass(frozen=True)
class _Layer:
    index: int
    in_channels: int
    out_channels: int
    height: int  # spatial size of the layer's input (= its output, padding 1)
    width: int
    acm_hidden: int | None  # None for an ungated layer
    pool: bool


def _geometry(model: ConvNet, input_shape=None) -> list[_Layer]:
    if input_shape is None:
        input_shape = (model.arch.in_channels, model.arch.image_size, model.arch.image_size)
    if len(input_shape) == 4:  # tolerate a batch shape
        input_shape = input_shape[1:]
    channels, height, width = (int(s) for s in input_shape)
    if channels != model.blocks[0].conv.in_channels:
        raise ValueError(f"input has {channels} channels, the model expects {model.blocks[0].conv.in_channels}")
    layers = []
    for i, (block, pool) in enumerate(zip(model.blocks, model.pool_after)):
        hidden = block.control.fc1.out_features if block.control is not None else None
        layers.append(_Layer(i, block.conv.in_channels, block.conv.out_channels, height, width, hidden, pool))
        if pool:  # max_pool2d(2) floors odd sizes
            height, width = height // 2, width // 2
    return layers


def _acm_macs(layer: _Layer) -> int:
    if layer.acm_hidden is None:
        return 0
    return layer.in_channels * layer.acm_hidden + layer.acm_hidden * layer.out_channels


# ---------------------------------------------------------- FLOP counts


def dense_flops(model: ConvNet, input_shape=None) -> dict:
    """MACs of one image when every filter runs (see the module docstring for
    what is counted).

    ``input_shape`` is (C, H, W) (a leading batch dimension is ignored);
    it defaults to the model's architecture.  Returns::

        {"layers": {"conv0": ..., "acm1": ..., "conv1": ..., ..., "head": ...},
         "backbone": sum of the convs and the head  (= the plain network),
         "acm": sum of the ACMs,
         "total": backbone + acm  (= the dense gated network)}

    ``convI``/``acmI`` are named after the block index I (block 0, the
    first convolution, has no ACM).  All values are Python ints.
    """
    layers: dict[str, int] = {}
    backbone = acm = 0
    geometry = _geometry(model, input_shape)
    for layer in geometry:
        if layer.acm_hidden is not None:
            layers[f"acm{layer.index}"] = a = _acm_macs(layer)
            acm += a
        layers[f"conv{layer.index}"] = c = (
            layer.height * layer.width * layer.out_channels * layer.in_channels * KERNEL
        )
        backbone += c
    layers["head"] = h = model.head.in_features * model.head.out_features
    backbone += h
    return {"layers": layers, "backbone": backbone, "acm": acm, "total": backbone + acm}


def executed_gates(model: ConvNet, images: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """The eval-mode binary gates of each gated layer, (N, C_out) each."""
    if not model.gated:
        return []
    batch = observe(model, images, batch_size)
    return list(split_layers(batch.paths, batch.widths))


def executed_flops_from_gates(model: ConvNet, gates: list[torch.Tensor], input_shape=None,
                              per_layer: bool = False):
    """``executed_flops`` for gates already computed (e.g. from a trace)."""
    geometry = _geometry(model, input_shape)
    gated = [layer for layer in geometry if layer.acm_hidden is not None]
    if len(gates) != len(gated):
        raise ValueError(f"{len(gates)} gate tensors for {len(gated)} gated layers")
    n = len(gates[0]) if gates else 1
    counts = iter(g.round().to(torch.int64).sum(dim=1) for g in gates)
    out: dict[str, torch.Tensor] = {}
    active_in = torch.full((n,), geometry[0].in_channels, dtype=torch.int64)
    for layer in geometry:
        if layer.acm_hidden is not None:
            out[f"acm{layer.index}"] = torch.full((n,), _acm_macs(layer), dtype=torch.int64)
            active_out = next(counts)
        else:
            active_out = torch.full((n,), layer.out_channels, dtype=torch.int64)
        out[f"conv{layer.index}"] = layer.height * layer.width * KERNEL * active_in * active_out
        active_in = active_out
    out["head"] = active_in * model.head.out_features
    if per_layer:
        return out
    return sum(out.values())


def executed_flops(model: ConvNet, images: torch.Tensor, per_layer: bool = False, batch_size: int = 256):
    """MACs that a gated forward of each image needs when switched-off
    filters are skipped (rule in the module docstring), ACM cost included.

    Returns an int64 tensor of shape (N,), or with ``per_layer=True`` a dict
    of such tensors keyed like ``dense_flops(...)["layers"]`` (their sum is
    the total).  The gates are the eval-mode binary ones, whatever mode the
    model is in.  A plain (ungated) model executes its dense count.
    """
    gates = executed_gates(model, images, batch_size)
    if not gates and not any(b.control is not None for b in model.blocks):
        dense = dense_flops(model, images.shape[1:])["layers"]
        out = {k: torch.full((len(images),), v, dtype=torch.int64) for k, v in dense.items()}
        return out if per_layer else sum(out.values())
    return executed_flops_from_gates(model, gates, images.shape[1:], per_layer)


def flop_summary(model: ConvNet, images: torch.Tensor) -> dict:
    """Dense counts, executed statistics and the two ratios worth quoting.

    ``ratio_vs_plain`` = mean executed / dense backbone: the fraction of the
    plain network's arithmetic that the skipping gated network performs, ACMs
    included (< 1 means a net saving).  ``ratio_vs_dense_gated`` = mean
    executed / dense total (dense gated network, ACMs included).
    """
    return flop_summary_from_gates(model, executed_gates(model, images), images.shape[1:])


def flop_summary_from_gates(model: ConvNet, gates: list[torch.Tensor], input_shape) -> dict:
    """``flop_summary`` for gates already computed (one inference pass serves
    every figure of a model card)."""
    dense = dense_flops(model, input_shape)
    executed = executed_flops_from_gates(model, gates, input_shape).to(torch.float64)
    mean = float(executed.mean())
    return {
        "unit": "MAC",
        "dense_backbone": dense["backbone"],
        "dense_acm": dense["acm"],
        "dense_total": dense["total"],
        "executed_mean": mean,
        "executed_min": float(executed.min()),
        "executed_max": float(executed.max()),
        "ratio_vs_plain": mean / dense["backbone"],
        "ratio_vs_dense_gated": mean / dense["total"],
        "images": len(executed),
    }


# ------------------------------------------------------- sparse inference


@dataclass
class SparseTrace:
    """One image through ``SparseGatedNet``.

    ``gates``/``gate_logits`` are full-width (C_out,) vectors per gated
    layer, like ``Trace``'s rows; ``active`` holds the indices of the filters
    that ran; ``macs`` counts the MACs actually launched (same rule as
    ``executed_flops``: convolutions, ACMs, head).
    """

    logits: torch.Tensor  # (num_classes,)
    gates: list[torch.Tensor] = field(default_factory=list)
    gate_logits: list[torch.Tensor] = field(default_factory=list)
    active: list[torch.Tensor] = field(default_factory=list)
    macs: int = 0
    features: torch.Tensor | None = None  # (C_last,) full width, zeros where a filter was off
    # every block's gated output averaged over space, full width ((C_out,) each), when asked for
    block_features: list[torch.Tensor] = field(default_factory=list)
    # and its standard deviation over space (models.spatial_spread), full width
    block_spreads: list[torch.Tensor] = field(default_factory=list)

    @property
    def path(self) -> torch.Tensor:
        return torch.cat(self.gates) if self.gates else torch.zeros(0)


class SparseGatedNet(nn.Module):
    """Batch-1 inference that really skips switched-off filters.

    Built once from a ``ConvNet`` (gated or plain; it is not modified):
    BatchNorm is folded into each convolution (W' = W * g/sqrt(var+eps),
    b' = beta - mean * g/sqrt(var+eps)) with the eval-mode running
    statistics, and the weights are copied, so later changes to ``model``
    are not seen.  Per image and gated layer l it

    1. pools the layer input over space (only the active channels exist;
       their means are scattered into a zero vector of full width, which is
       exactly the GAP of the dense, zero-filled input) and runs the ACM MLP
       to get z_l and the active set {k : z_l[k] > 0};
    2. runs ``F.conv2d`` with the folded weight sliced to the active output
       rows and the active input columns, then ReLU (and max-pool);
    3. at the end averages the active channels and applies the head's
       columns of active channels only.

    A layer whose filters are all off produces an empty map; the next
    convolution then sees a zero input and outputs relu(b') everywhere,
    which is computed without a convolution.  Inputs are pixels in [0, 1]
    (the model normalises internally; the normalisation is not folded into
    the first convolution because zero padding would then differ).

    The per-image loop runs compiled by TorchScript (``compiled=True``;
    "the per-image core" below: at batch 1 the interpreter costs as much as
    a small layer's arithmetic); ``compiled=False`` runs the same function
    as plain Python, with bit for bit the same results.
    """

    @property
    def scripted(self) -> bool | None:
        """Whether the core runs compiled (None until its first use)."""
        return self._core.scripted

    def __init__(self, model: ConvNet, compiled: bool = True) -> None:
        super().__init__()
        self.arch = model.arch
        self._core = _COMPILED if compiled else _EAGER
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())
        self.pool_after = list(model.pool_after)
        self.gated = [block.control is not None for block in model.blocks]
        for i, block in enumerate(model.blocks):
            bn = block.bn
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            self.register_buffer(f"weight{i}", (block.conv.weight.detach() * scale[:, None, None, None]).contiguous())
            self.register_buffer(f"bias{i}", (bn.bias.detach() - bn.running_mean * scale).contiguous())
            if block.control is not None:
                c = block.control
                # fc1 is kept transposed, (C_in, hidden): the rows of the active
                # input channels are then one contiguous gather
                for name, t in (("fc1_weight_t", c.fc1.weight.t()), ("fc1_bias", c.fc1.bias),
                                ("fc2_weight", c.fc2.weight), ("fc2_bias", c.fc2.bias)):
                    self.register_buffer(f"acm{i}_{name}", t.detach().clone().contiguous())
        self.register_buffer("head_weight", model.head.weight.detach().clone())
        self.register_buffer("head_bias", model.head.bias.detach().clone())
        self._collect()
        self.eval()

    def _collect(self) -> None:
        """The per-layer lists that ``_trace_one`` takes (rebuilt after
        ``.to()``, which replaces the buffers)."""
        count = len(self.gated)
        self._weights = [getattr(self, f"weight{i}") for i in range(count)]
        self._biases = [getattr(self, f"bias{i}") for i in range(count)]
        self._controls = [[getattr(self, f"acm{i}_{n}") for n in ("fc1_weight_t", "fc1_bias", "fc2_weight", "fc2_bias")]
                          if gated else [] for i, gated in enumerate(self.gated)]
        self._pools = [bool(p) for p in self.pool_after]
        self._all_readings = [True] * count
        self._no_readings = [False] * count

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._collect()
        return self

    @torch.no_grad()
    def trace_one(self, x: torch.Tensor, count: bool = False, blocks: bool = False) -> SparseTrace:
        """Run one image, (C, H, W) or (1, C, H, W); ``blocks=True`` also
        keeps every block's spatial mean and spread (``Trace.block_features``,
        ``Trace.block_spreads``).  ``count=True`` fills ``SparseTrace.macs``."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"SparseGatedNet runs one image at a time, got shape {tuple(x.shape)}")
        logits, features, gate_logits, gates, actives, means, spreads, macs = self._core.trace_one(
            x, *self._arguments(blocks))
        return SparseTrace(logits, gates, gate_logits, actives, macs if count else 0, features, means, spreads)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch, one image at a time: (N, num_classes)."""
        if x.ndim == 3:
            x = x.unsqueeze(0)
        return torch.stack([self.trace_one(x[i:i + 1]).logits for i in range(len(x))])

    @torch.no_grad()
    def trace_batch(self, x: torch.Tensor, count: bool = False) -> list[SparseTrace]:
        return [self.trace_one(x[i:i + 1], count=count) for i in range(len(x))]

    @property
    def gated_widths(self) -> list[int]:
        return [w.shape[0] for w, control in zip(self._weights, self._controls) if control]

    def _arguments(self, blocks) -> tuple:
        """The per-layer lists ``_trace_one`` takes after the image
        (``blocks``: True, False or the indices of the blocks to read)."""
        if blocks is True or blocks is False:
            readings = self._all_readings if blocks else self._no_readings
        else:
            readings = self._readings(blocks)
        return (self.mean, self.std, self._weights, self._biases, self._controls, self._pools, readings,
                self.head_weight, self.head_bias, SPREAD_EPS)

    def _readings(self, blocks) -> list[bool]:
        wanted = {int(i) for i in blocks}
        if not wanted <= set(range(len(self.gated))):
            raise ValueError(f"blocks {sorted(wanted)}: the network has blocks 0..{len(self.gated) - 1}")
        return [i in wanted for i in range(len(self.gated))]

    @torch.no_grad()
    def observe(self, images: torch.Tensor, blocks=False) -> PathBatch:
        """``paths.observe`` computed image by image with the skipping
        forward: the same fields (full-width paths, gate logits, features,
        every block's features with ``blocks=True``), equal to the dense
        model's to float tolerance.  Each image is computed alone, by
        kernels whose shapes depend only on that image's own path, so its
        row never depends on the other images of the batch.

        ``blocks`` may also name the blocks to read (a collection of
        indices, what ``Detector.blocks_read`` gives): those are computed,
        the others are (N, 0) placeholders, so the lists keep one entry per
        block and reading an unread block fails on its shape.  Reading
        fewer blocks changes no bit of what is read."""
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"observe needs a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
        arguments = self._arguments(blocks)
        logits, paths, gate_logits, features, means, spreads = self._core.observe(images, *arguments)
        readings = arguments[6]
        if not isinstance(blocks, bool):  # named blocks: one entry per block, placeholders for the rest
            read_means, read_spreads = iter(means), iter(spreads)
            empty = images.new_zeros((len(images), 0))
            means = [next(read_means) if read else empty for read in readings]
            spreads = [next(read_spreads) if read else empty for read in readings]
        return PathBatch(logits, paths, gate_logits, features, self.gated_widths, blocks=means, spreads=spreads)


# ------------------------------------------- the per-image core, compiled
#
# At batch 1 the arithmetic of a small layer takes about as long as the
# Python that launches it: in eager mode about 0.6 ms of a 2.3 ms image
# went to the interpreter (``bench/bench_sparse.py --profile``), and that
# overhead is paid by the skipping net and the BN-folded plain control
# alike, so it hid most of what skipping saves.  The loop below is
# therefore written in the subset of Python that TorchScript compiles
# (typed lists, no closures over globals, constants inlined) and run
# compiled.  TorchScript runs the same ATen kernels with the same
# arguments, so the results are bit for bit those of the same function run
# as plain Python (tests/test_acceleration.py checks this on real images);
# no operator fusion is involved (CPU fusion is off in this torch build and
# nothing here would fuse in a way that reorders a sum).


def _slice_filters(weight: torch.Tensor, rows: Optional[torch.Tensor],
                   columns: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight[rows][:, columns]`` (None = all): the active filters'
    kernels of the active input channels.  With both, one gather over the
    (C_out * C_in) kernels: it copies only what the convolution reads,
    where slicing the rows first copied every input channel's kernel too
    (0.65x the time on a 256 x 256 layer at half density, about the same
    on small ones)."""
    if rows is not None and columns is not None:
        c_out, c_in, kh, kw = weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3]
        kernels = torch.add(columns, rows.unsqueeze(1), alpha=c_in).view(-1)
        return weight.view(c_out * c_in, kh, kw).index_select(0, kernels).view(
            rows.shape[0], columns.shape[0], kh, kw)
    if rows is not None:
        return weight.index_select(0, rows)
    if columns is not None:
        return weight.index_select(1, columns)
    return weight


def _spatial_mean(h: torch.Tensor) -> torch.Tensor:
    """(C,): one image's (1, C, H, W) map averaged over space, in one kernel
    (``mean(dim=(2, 3))`` launches two); C may be 0."""
    return h.reshape(h.shape[1], h.shape[2] * h.shape[3]).mean(1)


def _spatial_moments(h: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """((C,), (C,)): one image's (1, C, H, W) map's per-channel mean and
    spread over space, as ``models.spatial_spread`` computes the spread
    (``eps`` is ``models.SPREAD_EPS``, an argument because TorchScript
    cannot read a global); C may be 0.  The spread from the centred
    squares, not ``var``: with torch's CPU var kernel the whole per-image
    pass took 1.2x as long (``bench/bench_spread.py``)."""
    flat = h.reshape(h.shape[1], h.shape[2] * h.shape[3])
    mean = flat.mean(1)
    centred = flat - mean.unsqueeze(1)
    return mean, (centred.square().mean(1) + eps).sqrt()


def _full_width(values: torch.Tensor, index: Optional[torch.Tensor], width: int,
                fill: float = 0.0) -> torch.Tensor:
    """``values`` of the channels ``index`` (None = all of them) scattered
    into a vector of ``width`` filled with ``fill``: what the dense gated
    model holds, whose switched-off channels are exactly zero (their mean
    0, their spread sqrt(SPREAD_EPS))."""
    if index is None:
        return values
    return values.new_full([width], fill).index_copy_(0, index, values)


def _control_logits(h: torch.Tensor, active: Optional[torch.Tensor], n_active: int,
                    control: List[torch.Tensor]) -> torch.Tensor:
    """A gated layer's gate logits from its ACM (``control``: fc1 weight
    transposed, fc1 bias, fc2 weight, fc2 bias) on the spatial mean of
    ``h``, whose channels are the full width's ``active`` (None = all)."""
    w1t = control[0]
    if active is None:
        hidden = torch.addmv(control[1], w1t.t(), _spatial_mean(h))
    elif n_active > 0:
        hidden = torch.addmv(control[1], w1t.index_select(0, active).t(), _spatial_mean(h))
    else:
        hidden = control[1].clone()  # an all-zero input: fc1 gives its bias
    return torch.addmv(control[3], control[2], hidden.relu_())


def _convolve(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out_idx: Optional[torch.Tensor],
              active: Optional[torch.Tensor], rows: int, n_active: int, relu: bool) -> Tuple[torch.Tensor, int]:
    """The 3x3 convolution of the active input channels by the active
    filters (``b`` already sliced to them), ReLU'd in place when ``relu``,
    and the MACs it launched."""
    height = h.shape[2]
    width = h.shape[3]
    if rows == 0:
        # Every filter off: nothing to compute, an empty map.
        return h.new_zeros([1, 0, height, width]), 0
    if n_active == 0:
        # Zero input: the convolution reduces to its folded bias.
        return torch.relu(b).view(1, -1, 1, 1).expand(1, rows, height, width), 0
    w = _slice_filters(w, out_idx, active)
    out = F.conv2d(h, w, b, 1, 1)
    if relu:
        out = out.relu_()
    return out, height * width * w.shape[0] * w.shape[1] * 9


def _pool_2x2(h: torch.Tensor, relu: bool) -> torch.Tensor:
    """The 2x2 max-pool (then an in-place ReLU when ``relu``); an empty map stays empty."""
    if h.shape[1] == 0:
        return h.new_zeros([1, 0, h.shape[2] // 2, h.shape[3] // 2])
    h = max_pool_2x2(h)
    return h.relu_() if relu else h


def _trace_one(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weights: List[torch.Tensor],
               biases: List[torch.Tensor], controls: List[List[torch.Tensor]], pools: List[bool],
               readings: List[bool], head_weight: torch.Tensor, head_bias: torch.Tensor, spread_eps: float
               ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor],
                          List[torch.Tensor], List[torch.Tensor], int]:
    """One (1, C, H, W) image through the skipping network (``SparseGatedNet``).

    Per layer i: the folded ``weights[i]``/``biases[i]``; ``controls[i]`` the
    ACM's [fc1 weight transposed, fc1 bias, fc2 weight, fc2 bias], or [] for
    an ungated layer; ``pools[i]`` a 2x2 max-pool after it; ``readings[i]``
    keep its spatial mean and spread (``spread_eps``: ``models.SPREAD_EPS``).  Returns the logits, the full-width
    features, per gated layer the gate logits, the gates (0/1 in x's dtype)
    and the active filters' indices, per read block its full-width mean and
    spread, and the MACs launched (convolutions, ACMs, head).

    Written for few kernel launches: the ACM reads only the active input
    channels' rows of fc1 (the switched-off ones are zeros in the dense
    model's pooled vector), a weight is sliced by one gather over its
    (C_out * C_in) kernels, ReLU runs in place and after the max-pool (they
    commute exactly) where the block is not read.
    """
    h = (x - mean) / std
    active: Optional[torch.Tensor] = None  # indices of h's channels in the full width; None = all
    n_active = h.shape[1]
    gate_logits: List[torch.Tensor] = []
    gates: List[torch.Tensor] = []
    actives: List[torch.Tensor] = []
    block_means: List[torch.Tensor] = []
    block_spreads: List[torch.Tensor] = []
    macs = 0
    for i in range(len(weights)):
        w = weights[i]
        b = biases[i]
        control = controls[i]
        pool = pools[i]
        c_out = w.shape[0]
        out_idx: Optional[torch.Tensor] = None  # None = every filter on
        rows = c_out
        if len(control) > 0:
            z = _control_logits(h, active, n_active, control)
            on = z > 0
            idx = torch.nonzero(on).squeeze(1)
            gate_logits.append(z)
            gates.append(on.to(x.dtype))
            actives.append(idx)
            macs += control[0].numel() + control[2].numel()
            rows = idx.shape[0]
            if rows != c_out:
                out_idx = idx
                b = b.index_select(0, idx)
        relu_after_pool = pool and not readings[i]  # 4x fewer values; the block readings need it before
        h, conv_macs = _convolve(h, w, b, out_idx, active, rows, n_active, not relu_after_pool)
        macs += conv_macs
        if readings[i]:
            m, s = _spatial_moments(h, spread_eps)
            block_means.append(_full_width(m, out_idx, c_out))
            block_spreads.append(_full_width(s, out_idx, c_out, spread_eps ** 0.5))
        if pool:
            h = _pool_2x2(h, relu_after_pool)
        active = out_idx
        n_active = rows
    features = _spatial_mean(h)
    if active is not None:
        head_weight_active = head_weight.index_select(1, active)
    else:
        head_weight_active = head_weight
    logits = torch.addmv(head_bias, head_weight_active, features)
    macs += head_weight_active.shape[0] * head_weight_active.shape[1]
    features = _full_width(features, active, head_weight.shape[1])
    return logits, features, gate_logits, gates, actives, block_means, block_spreads, macs


def _observe(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, weights: List[torch.Tensor],
             biases: List[torch.Tensor], controls: List[List[torch.Tensor]], pools: List[bool],
             readings: List[bool], head_weight: torch.Tensor, head_bias: torch.Tensor, spread_eps: float
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor],
                        List[torch.Tensor]]:
    """``_trace_one`` for each of (N, C, H, W) ``images``, stacked: logits,
    paths, gate logits, features (N rows each) and per read block its means
    and spreads (N, C_block).  A network with no gated layer has (N, 0)
    paths and gate logits."""
    logits: List[torch.Tensor] = []
    paths: List[torch.Tensor] = []
    gate_logits: List[torch.Tensor] = []
    features: List[torch.Tensor] = []
    means: List[List[torch.Tensor]] = []
    spreads: List[List[torch.Tensor]] = []
    n = images.shape[0]
    gated = 0
    for control in controls:
        if len(control) > 0:
            gated += 1
    for i in range(n):
        result = _trace_one(images[i:i + 1], mean, std, weights, biases, controls, pools, readings,
                            head_weight, head_bias, spread_eps)
        logits.append(result[0])
        features.append(result[1])
        if gated > 0:
            gate_logits.append(torch.cat(result[2]))
            paths.append(torch.cat(result[3]))
        means.append(result[5])
        spreads.append(result[6])
    if gated > 0:
        path_matrix = torch.stack(paths)
        gate_matrix = torch.stack(gate_logits)
    else:
        path_matrix = torch.zeros([n, 0])
        gate_matrix = torch.zeros([n, 0])
    block_means = [torch.stack([row[j] for row in means]) for j in range(len(means[0]))]
    block_spreads = [torch.stack([row[j] for row in spreads]) for j in range(len(spreads[0]))]
    return torch.stack(logits), path_matrix, gate_matrix, torch.stack(features), block_means, block_spreads


class _Core:
    """``_trace_one`` and ``_observe``, compiled by TorchScript once, at
    first use (about a second), or run as plain Python (``compile=False``,
    or where TorchScript is not available: the same results, slower at
    batch 1).  TorchScript is
    deprecated in favour of torch.compile, which needs a C++ toolchain at run
    time and recompiles for every new active-set size, so it does not fit a
    per-image loop whose shapes follow each image's path; the project pins
    its torch version, under which scripting works (``scripted`` says
    whether it did)."""

    def __init__(self, compile: bool) -> None:
        self._compiled: tuple | None = None if compile else (_trace_one, _observe)
        self.scripted: bool | None = None if compile else False

    def _functions(self) -> tuple:
        if self._compiled is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # the deprecation above, once
                    self._compiled = (torch.jit.script(_trace_one), torch.jit.script(_observe))
                self.scripted = True
            except Exception as error:  # noqa: BLE001 - any failure to compile: run the same code eagerly
                warnings.warn(f"TorchScript unavailable ({error}); the skipping engine runs as plain Python",
                              RuntimeWarning, stacklevel=3)
                self._compiled = (_trace_one, _observe)
                self.scripted = False
        return self._compiled

    def trace_one(self, *args):
        return self._functions()[0](*args)

    def observe(self, *args):
        return self._functions()[1](*args)


_COMPILED = _Core(compile=True)  # shared: scripting runs once per process
_EAGER = _Core(compile=False)


# ------------------------------------------------ test / benchmark helper


@torch.no_grad()
def randomise_controls(model: ConvNet, seed: int = 0, scale: float = 3.0) -> ConvNet:
    """Give an untrained model mixed on/off gates (for tests and benchmarks).

    With the authors' initialisation every gate is on, which would never
    exercise skipping.  This draws every ACM weight from
    N(0, (scale / sqrt(fan_in))^2), fc1 biases from N(0, 0.1^2) and sets fc2
    biases to 0, so roughly half of the gates are off, input-dependently.
    BatchNorm running statistics and affine parameters are randomised too so
    that folding BN is really exercised.  Modifies ``model`` in place and
    returns it (in eval mode).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=g))

    for block in model.blocks:
        bn = block.bn
        normal(bn.running_mean, 0.2)
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=g))
        normal(bn.weight, 0.25, 1.0)
        normal(bn.bias, 0.2)
        if block.control is not None:
            c = block.control
            normal(c.fc1.weight, scale / c.fc1.in_features ** 0.5)
            normal(c.fc1.bias, 0.1)
            normal(c.fc2.weight, scale / c.fc2.in_features ** 0.5)
            c.fc2.bias.zero_()
    return model.eval()
