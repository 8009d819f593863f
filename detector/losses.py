"""The decoupling objective (docs/method.md, "Training objective"), one
function per term.

Each function takes the tensors of one gated layer and returns a scalar, so
each can be checked on hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def alignment_loss(layer_output: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """KL( softmax(GAP(o_l)) || softmax(v_l) ), averaged over the batch.

    Pulls the encoding vector toward the filters that actually respond to
    the image: a gate should be on where the (pre-gate) output is strong.
    """
    target = F.softmax(layer_output.mean(dim=(2, 3)), dim=1)
    return F.kl_div(F.log_softmax(gate, dim=1), target, reduction="batchmean")


def path_class_loss(gate: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """CE( W_l v_l, y ): the mutual-information surrogate; the path of a
    layer alone must tell the image's class."""
    return F.cross_entropy(head(gate), labels)


def sparsity_loss(gate: torch.Tensor, target_ratio: float) -> torch.Tensor:
    """| mean_batch ||v_l||_1 - rho * C_out |, divided by C_out.

    Dividing by the layer width makes one lambda_s act alike on narrow and
    wide layers (the paper's form, undivided, weighs wide layers more); with
    rho = 0 it is the plain L1 penalty.
    """
    width = gate.shape[1]
    return (gate.abs().sum(dim=1).mean() - target_ratio * width).abs() / width


@dataclass(frozen=True)
class DecouplingWeights:
    lambda_k: float = 1.0
    lambda_m: float = 0.04
    lambda_s: float = 1.0
    target_ratio: float = 0.5


def decoupling_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gates: list[torch.Tensor],
    outputs: list[torch.Tensor],
    heads: nn.ModuleList,
    weights: DecouplingWeights,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms (for logging), summed over gated layers."""
    ce = F.cross_entropy(logits, labels)
    kl = sum(alignment_loss(o, v) for o, v in zip(outputs, gates))
    mi = sum(path_class_loss(v, labels, h) for v, h in zip(gates, heads))
    sp = sum(sparsity_loss(v, weights.target_ratio) for v in gates)
    total = ce + weights.lambda_k * kl + weights.lambda_m * mi + weights.lambda_s * sp
    terms = {"ce": ce.item(), "kl": float(kl.detach()), "mi": float(mi.detach()), "sp": float(sp.detach())}
    return total, terms
