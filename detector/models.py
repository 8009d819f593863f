"""Plain and decoupled VGG-style networks that share one backbone definition.

The decoupled network is the plain one plus an ArchitectureControl per gated
convolution (every convolution but the first).  Models take pixels in [0, 1]
and normalise internally, so attacks, the service and training all speak
the same input space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .gates import ArchitectureControl, binary_gate, training_gate

POOL = "M"
# Added to a channel's spatial variance before its square root: a constant
# channel (a switched-off filter, a dead ReLU) then has spread 1e-3 and a
# finite gradient, which the adaptive attack differentiates through.
SPREAD_EPS = 1e-6


def spatial_moments(activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, C), (N, C)): each channel's mean over space and its standard
    deviation over space, sqrt(var + SPREAD_EPS), of an (N, C, H, W) map.
    Strong L-inf attacks add high-frequency energy that a spatial mean
    averages away and the spread keeps (docs/method.md, "Detector v2").
    The spread from the centred squares around that mean rather than
    ``var``: as exact, and torch's CPU var kernel took 1.7-4.9x as long on
    vgg7's maps at batch 256 (``bench/bench_spread.py``)."""
    mean = activation.mean(dim=(2, 3), keepdim=True)
    centred = activation - mean
    return mean.flatten(2).squeeze(2), (centred.square().mean(dim=(2, 3)) + SPREAD_EPS).sqrt()


def spatial_spread(activation: torch.Tensor) -> torch.Tensor:
    """(N, C): the spread of ``spatial_moments``."""
    return spatial_moments(activation)[1]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``nn.functional.max_pool2d(x, 2)``, bit for bit (a maximum is exact
    whatever the order), faster on CPU where no gradient is needed.

    On CPU, torch's max_pool2d kernel for contiguous (N, C, H, W) tensors is
    slow on these small maps: 0.9-1.5 ms for a batch of 8 at 28x28 or 14x14,
    a quarter of the whole forward pass.  The elementwise maximum of the four
    strided 2x2 views gives the same values 4-7x faster
    (``bench/bench_forward.py``).  Under autograd, and off the CPU, it is
    max_pool2d itself: an autograd version that wrote max_pool2d's indices
    and used its backward kernel gave the same gradients bit for bit but made
    an attack step 6-12% slower, so attacks keep max_pool2d.
    """
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or x.ndim != 4:
        return nn.functional.max_pool2d(x, 2)
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor odd sizes, as max_pool2d does
    top = torch.maximum(x[:, :, 0:h:2, 0:w:2], x[:, :, 0:h:2, 1:w:2])
    bottom = torch.maximum(x[:, :, 1:h:2, 0:w:2], x[:, :, 1:h:2, 1:w:2])
    return torch.maximum(top, bottom)


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a network, stored as JSON in a bundle."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    # Output channels of each 3x3 convolution; "M" is a 2x2 max-pool.
    layers: tuple = ()
    dropout: float = 0.0
    mean: tuple = (0.5,)
    std: tuple = (0.5,)

    def to_json(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Architecture":
        fields = dict(data)
        for key in ("layers", "mean", "std"):
            fields[key] = tuple(fields[key])
        return cls(**fields)

    @property
    def conv_channels(self) -> list[int]:
        return [c for c in self.layers if c != POOL]


ARCHITECTURES: dict[str, Architecture] = {
    # 28x28 grey images (Fashion-MNIST, MNIST): 5 convolutions, 4 of them gated.
    "vgg-small": Architecture(
        name="vgg-small", in_channels=1, image_size=28, num_classes=10,
        layers=(32, POOL, 64, 64, POOL, 128, 128, POOL), dropout=0.1,
        mean=(0.2860,), std=(0.3530,),
    ),
    # 28x28 grey images: VGG-style with seven convolutions, six of them
    # gated (docs/method.md, "Backbones"): more layers for a path to carry
    # the class through, and wide enough that half the filters still fit it.
    "vgg7": Architecture(
        name="vgg7", in_channels=1, image_size=28, num_classes=10,
        layers=(64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL), dropout=0.1,
        mean=(0.2860,), std=(0.3530,),
    ),
    # The same depth at half the width: about a quarter of the MACs.
    "vgg7-slim": Architecture(
        name="vgg7-slim", in_channels=1, image_size=28, num_classes=10,
        layers=(32, 32, POOL, 64, 64, POOL, 128, 128, 128, POOL), dropout=0.1,
        mean=(0.2860,), std=(0.3530,),
    ),
    # 32x32 colour images (CIFAR-10): VGG-11-like, 7 gated convolutions.
    "vgg-cifar": Architecture(
        name="vgg-cifar", in_channels=3, image_size=32, num_classes=10,
        layers=(64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
        dropout=0.2, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    ),
}


def architecture_for(name: str, in_channels: int, image_size: int, num_classes: int,
                     mean: tuple | None = None, std: tuple | None = None) -> Architecture:
    """A named backbone adapted to a dataset's shape and class count; the
    input normalisation is ``mean``/``std`` (per channel, computed from the
    training data) or, without them, the backbone's own."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    base = ARCHITECTURES[name]
    if mean is None or std is None:
        mean = base.mean if len(base.mean) == in_channels else (0.5,) * in_channels
        std = base.std if len(base.std) == in_channels else (0.5,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"normalisation needs {in_channels} means and stds, got {mean}, {std}")
    return Architecture(
        name=base.name, in_channels=in_channels, image_size=image_size, num_classes=num_classes,
        layers=base.layers, dropout=base.dropout, mean=tuple(mean), std=tuple(std),
    )


@dataclass
class Trace:
    """What one forward pass reveals about a batch.

    gates[l] and gate_logits[l] are (batch, C_out of gated layer l), in the
    order of the gated convolutions from input to output.  The rest is
    filled only when asked for, because it is large: ``outputs`` holds each
    gated layer's output *before* gating (o_l of the decoupling objective,
    docs/method.md), ``activations`` every block's gated output,
    ``block_features`` every block's gated output averaged over space and
    ``block_spreads`` its standard deviation over space (``spatial_spread``).
    """

    logits: torch.Tensor
    features: torch.Tensor
    gate_logits: list[torch.Tensor] = field(default_factory=list)
    gates: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    activations: list[torch.Tensor] = field(default_factory=list)
    block_features: list[torch.Tensor] = field(default_factory=list)
    block_spreads: list[torch.Tensor] = field(default_factory=list)

    @property
    def path(self) -> torch.Tensor:
        """The calculation path: all gate bits concatenated, (batch, D)."""
        return torch.cat(self.gates, dim=1)

    @property
    def path_logits(self) -> torch.Tensor:
        return torch.cat(self.gate_logits, dim=1)


@dataclass
class BlockOutput:
    """One block's forward: its gated output (pooled when the block pools),
    and for a gated block the gate logits z, the gate v and the output
    before gating."""

    output: torch.Tensor
    gate_logits: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    before_gate: torch.Tensor | None = None
    activation: torch.Tensor | None = None  # gated output before pooling


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, gated: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.control = ArchitectureControl(in_channels, out_channels) if gated else None


class ConvNet(nn.Module):
    """VGG-style network; ``gated=True`` makes it the decoupled network."""

    def __init__(self, arch: Architecture, gated: bool) -> None:
        super().__init__()
        self.arch = arch
        self.gated = gated
        self.gate_noise = 1.0
        self.gate_hard_prob = 0.5
        self.register_buffer("mean", torch.tensor(arch.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(arch.std).view(1, -1, 1, 1), persistent=False)
        blocks, pool_after = [], []
        channels = arch.in_channels
        for item in arch.layers:
            if item == POOL:
                pool_after[-1] = True
                continue
            # The first convolution stays ungated (docs/method.md).
            blocks.append(ConvBlock(channels, item, gated=gated and bool(blocks)))
            pool_after.append(False)
            channels = item
        self.blocks = nn.ModuleList(blocks)
        self.pool_after = pool_after
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(channels, arch.num_classes)

    @property
    def gated_widths(self) -> list[int]:
        return [b.conv.out_channels for b in self.blocks if b.control is not None]

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trace(x).logits

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] to the network's input scale."""
        return (x - self.mean) / self.std

    def gate(self, z: torch.Tensor, soft_temperature: float | None = None) -> torch.Tensor:
        """The gate for logits z: noisy straight-through in training mode,
        sigmoid(z / T) with ``soft_temperature`` (the differentiable
        surrogate only the adaptive attack uses), else the binary gate."""
        if self.training:
            return training_gate(z, self.gate_noise, hard_prob=self.gate_hard_prob)
        if soft_temperature is not None:
            return torch.sigmoid(z / soft_temperature)
        return binary_gate(z)

    def run_block(self, index: int, h: torch.Tensor, soft_temperature: float | None = None) -> BlockOutput:
        """Block ``index`` on its input ``h`` (the previous block's output,
        or the normalised image for block 0): conv, BN, ReLU, the gate
        (after ReLU, as in the paper), then the max-pool if the block has one."""
        block = self.blocks[index]
        out = torch.relu(block.bn(block.conv(h)))
        result = BlockOutput(out)
        if block.control is not None:
            z = block.control(h)
            v = self.gate(z, soft_temperature)
            result.before_gate, result.gate_logits, result.gate = out, z, v
            out = out * v[:, :, None, None]
        result.activation = out
        result.output = max_pool_2x2(out) if self.pool_after[index] else out
        return result

    def block_activations(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Gated output of block ``index`` (before its pool) for images x."""
        h = self.normalise(x)
        for i in range(index + 1):
            step = self.run_block(i, h)
            h = step.output
        return step.activation

    def trace(self, x: torch.Tensor, keep_outputs: bool = False, keep_activations: bool = False,
              soft_temperature: float | None = None, keep_blocks: bool = False) -> Trace:
        """One forward pass through every block (``run_block``), keeping
        what is asked for."""
        h = self.normalise(x)
        trace = Trace(logits=None, features=None)
        for index in range(len(self.blocks)):
            step = self.run_block(index, h, soft_temperature)
            if step.gate is not None:
                trace.gate_logits.append(step.gate_logits)
                trace.gates.append(step.gate)
                if keep_outputs:
                    trace.outputs.append(step.before_gate)
            if keep_activations:
                trace.activations.append(step.activation)
            if keep_blocks:
                mean, spread = spatial_moments(step.activation)  # one spatial mean for both
                trace.block_features.append(mean)
                trace.block_spreads.append(spread)
            h = step.output
        trace.features = h.mean(dim=(2, 3))
        trace.logits = self.head(self.dropout(trace.features))
        return trace

    def load_plain_weights(self, plain: "ConvNet") -> None:
        """Initialise the shared backbone from a trained plain network; the
        ACMs keep their all-on initialisation."""
        missing, unexpected = self.load_state_dict(plain.state_dict(), strict=False)
        if unexpected or any(".control." not in k for k in missing):
            raise ValueError(f"plain weights do not fit: missing={missing} unexpected={unexpected}")


def build_model(arch: Architecture, gated: bool) -> ConvNet:
    return ConvNet(arch, gated)
