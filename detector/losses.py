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
    The spatial mean is taken in float32 whatever the output's dtype (a
    bfloat16 output of `pathguard train --precision bf16` is not copied).
    """
    target = F.softmax(layer_output.mean(dim=(2, 3), dtype=torch.float32), dim=1)
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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL( softmax(teacher / T) || softmax(student / T) ) (Hinton et
    al. 2015): the decoupled net learns the plain net's soft answers, which
    carry how classes resemble each other, not only the label."""
    t = temperature
    target = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), target, log_target=True,
                    reduction="batchmean") * t * t


def hard_bits(gate_logits: torch.Tensor) -> torch.Tensor:
    """The inference path 1[z > 0] in the forward pass, with the gradient of
    sigmoid(z) (straight-through): what the path-class head reads when it is
    to learn from the bits a deployed model actually produces."""
    soft = torch.sigmoid(gate_logits)
    return (gate_logits > 0).to(soft.dtype) + (soft - soft.detach())


def layer_weights(layers: int, front_weight: float) -> list[float]:
    """Weights of the path-class term per gated layer: ``front_weight`` for
    the first, 1 for the last, linear in between.  Early layers see less
    of the class and need the stronger push."""
    if layers == 1:
        return [1.0]
    return [front_weight + (1.0 - front_weight) * i / (layers - 1) for i in range(layers)]


@dataclass(frozen=True)
class DecouplingWeights:
    lambda_k: float = 1.0
    lambda_m: float = 0.04
    lambda_s: float = 1.0
    target_ratio: float = 0.5
    mi_front_weight: float = 1.0  # path-class weight of the first gated layer relative to the last
    mi_hard_bits: bool = False  # path-class heads read the hard bits (straight-through), not the training gate
    distill_weight: float = 0.0  # weight of the distillation term (0: none)
    distill_temperature: float = 4.0


def decoupling_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gates: list[torch.Tensor],
    outputs: list[torch.Tensor],
    heads: nn.ModuleList,
    weights: DecouplingWeights,
    gate_logits: list[torch.Tensor] | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (detached tensors, for logging without a
    device sync), summed over gated layers; ``mi_<l>`` is layer l's
    path-class cross-entropy (chance: ln of the class count)."""
    ce = F.cross_entropy(logits, labels)
    kl = sum(alignment_loss(o, v) for o, v in zip(outputs, gates))
    if weights.mi_hard_bits:
        if gate_logits is None:
            raise ValueError("mi_hard_bits needs the gate logits")
        path_inputs = [hard_bits(z) for z in gate_logits]
    else:
        path_inputs = gates
    per_layer = [path_class_loss(v, labels, h) for v, h in zip(path_inputs, heads)]
    mi_weights = layer_weights(len(per_layer), weights.mi_front_weight)
    mi = sum(w * m for w, m in zip(mi_weights, per_layer))
    sp = sum(sparsity_loss(v, weights.target_ratio) for v in gates)
    total = ce + weights.lambda_k * kl + weights.lambda_m * mi + weights.lambda_s * sp
    terms = {"ce": ce.detach(), "kl": kl.detach(), "mi": sum(per_layer).detach(), "sp": sp.detach()}
    if weights.distill_weight > 0:
        if teacher_logits is None:
            raise ValueError("distill_weight > 0 needs the teacher's logits")
        kd = distillation_loss(logits, teacher_logits, weights.distill_temperature)
        total = total + weights.distill_weight * kd
        terms["kd"] = kd.detach()
    terms.update({f"mi_{i}": m.detach() for i, m in enumerate(per_layer)})
    return total, terms
