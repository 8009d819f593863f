"""BPDA (Athalye et al. 2018): attack the gated network through a
differentiable stand-in for its binary gates, keep what fools the real one.

The real gates are step functions, 1[z > 0]: their gradient is zero, so a
plain white-box attack sees the current path as fixed and cannot aim at a
gate flip (docs/evaluation.md, "Attacks").  The soft-gate surrogate replaces
each gate by sigmoid(z / T) (``ConvNet.trace(..., soft_temperature=T)``,
the same surrogate the adaptive attack differentiates); as T -> 0 it tends
to the real network.  ``BPDA`` runs any torchattacks attack against
``SoftGateSurrogate`` and then judges every adversarial image on the *real*
gated model: an image that does not fool the real model is replaced by its
original, so success is always the real model's.

``real_forward=True`` is BPDA proper (Athalye et al.: forward pass through
the real function, backward pass through the approximation): the
surrogate's logits take the real model's values and the soft network's
gradient, so attacks that stop early or keep their best iterate (DeepFool,
CW) decide on the real model's answers.  The ``-bpda`` presets use it
(attacks/presets.py); ``real_forward=False`` attacks the soft network
outright, a transfer attack.
"""

from __future__ import annotations

from typing import Any

import torch
import torchattacks
from torch import nn


class SoftGateSurrogate(nn.Module):
    """``model`` with soft gates sigmoid(z / T); always in eval mode.

    torchattacks switches the model it attacks back to training mode after
    the attack if it found it in training mode, and ``train()`` on this
    wrapper would reach the wrapped network: the wrapper therefore starts
    in eval mode and refuses training mode.
    """

    def __init__(self, model: nn.Module, temperature: float, real_forward: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"the surrogate temperature must be positive, got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        self.real_forward = bool(real_forward)
        self.eval()

    def train(self, mode: bool = True) -> SoftGateSurrogate:
        if mode:
            raise RuntimeError("the soft-gate surrogate only exists in eval mode")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = self.model.trace(x, soft_temperature=self.temperature).logits
        if not self.real_forward:
            return soft
        with torch.no_grad():
            real = self.model(x)
        return real + (soft - soft.detach())


class BPDA(torchattacks.attack.Attack):
    """``base_attack`` crafted on the soft-gate surrogate of ``model``;
    adversarial images that do not fool ``model`` itself are replaced by
    their originals.  Subclasses name the base attack (``bpda_class``)."""

    base_attack: type = torchattacks.attack.Attack

    def __init__(self, model: nn.Module, temperature: float = 1.0, real_forward: bool = True,
                 **params: Any) -> None:
        super().__init__(f"BPDA-{self.base_attack.__name__}", model)
        self.temperature, self.real_forward = temperature, real_forward
        self.surrogate = SoftGateSurrogate(model, temperature, real_forward)
        self.inner = self.base_attack(self.surrogate, **params)
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = self.inner(images, labels)
        if isinstance(adv, (tuple, list)):
            adv = adv[0]
        adv = adv.detach().clamp(0, 1)
        return keep_fooling(self.model, images, adv, labels)


def keep_fooling(model: nn.Module, images: torch.Tensor, adversarial: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """``adversarial`` where ``model`` misclassifies it, else the original."""
    with torch.no_grad():
        fooled = model(adversarial).argmax(dim=1) != labels
    return torch.where(fooled.view(-1, *([1] * (images.ndim - 1))), adversarial, images)


def bpda_class(base: type) -> type:
    """A BPDA attack class around the torchattacks class ``base``."""
    return type(f"BPDA{base.__name__}", (BPDA,), {"base_attack": base, "__doc__": BPDA.__doc__})
