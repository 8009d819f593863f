"""Architecture controlling module (ACM) and the binary gate of the decoupled
network (docs/method.md, "Decoupled network").

Every gated layer owns one ``ArchitectureControl``: it looks at the layer's
*input*, and emits one logit per output filter.  The logit becomes a binary
switch at inference and a noisy, straight-through mix of hard and soft
values during training ("improved semantic hashing", Kaiser & Bengio 2018).
"""

from __future__ import annotations

import torch
from torch import nn


def saturating_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """clamp(1.2 * sigmoid(z) - 0.1, 0, 1): reaches exactly 0 and 1, so the
    soft gate can actually switch a filter fully off or on."""
    return torch.clamp(1.2 * torch.sigmoid(z) - 0.1, 0.0, 1.0)


def binary_gate(z: torch.Tensor) -> torch.Tensor:
    """Inference gate v = 1[z > 0], as a float tensor of 0/1."""
    return (z > 0).to(z.dtype)


def training_gate(
    z: torch.Tensor, noise_std: float = 1.0, generator: torch.Generator | None = None, hard_prob: float = 0.5
) -> torch.Tensor:
    """Noisy improved-semantic-hashing gate used while training.

    Gaussian noise keeps the logits away from 0 (a logit must be clearly
    positive or negative to survive the noise), which is what makes the hard
    gate at inference close to what training saw.  On a random half of the
    positions the forward value is the hard bit with the soft gate's gradient
    (straight-through); elsewhere it is the soft gate itself.
    """
    noisy = z
    if noise_std > 0:
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        noisy = z + noise_std * noise
    soft = saturating_sigmoid(noisy)
    hard = (noisy > 0).to(z.dtype)
    straight_through = hard + (soft - soft.detach())  # exactly the hard bit forward
    use_hard = torch.rand(z.shape, generator=generator, device=z.device) < hard_prob
    return torch.where(use_hard, straight_through, soft)


class ArchitectureControl(nn.Module):
    """GAP(layer input) -> Linear(C_in, C_in/4) -> ReLU -> Linear(C_in/4, C_out).

    Initialised as in the authors' release (first Linear's weights 0, both
    biases 1) so that at the start of fine-tuning every filter is on and the
    decoupled net computes what the plain net it was copied from computes.
    The second Linear's weights start tiny (std 0.01) rather than at
    PyTorch's default: with the default, 1 + (row sum of W2) falls below 0
    for about 4% of filters, which would start switched off.  They cannot
    start at exactly 0 either: every hidden unit would then stay identical.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = max(in_channels // 4, 1)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.fc1.weight)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.ones_(self.fc1.bias)
        nn.init.ones_(self.fc2.bias)

    def forward(self, layer_input: torch.Tensor) -> torch.Tensor:
        pooled = layer_input.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(pooled)))
