"""Named attack presets: the attacks of the evaluation protocol
(docs/evaluation.md, "Attacks").

Each preset pins one torchattacks class and every one of its parameters, so
an attack set can be regenerated from its name plus the overrides recorded
with it.  Parameters are overridable one by one; an override must name a
parameter the preset already has and keep its type, so a typo (``esp=0.1``)
or a stray string from the command line is refused instead of silently
falling back to a torchattacks default.

The low-budget variants use eps 0.03 with the step size scaled to eps/10,
mirroring the full-budget presets (eps 0.1, step 0.01).  Overriding ``eps``
does not rescale ``alpha``: what runs is exactly what the config records.

Attacks are white-box against the model *in inference mode* (binary gates,
no dropout): ``make_attack`` puts the model in eval mode and tells
torchattacks not to switch it back to training mode during the attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torchattacks
from torch import nn


@dataclass(frozen=True)
class AttackPreset:
    """One named attack: the torchattacks class, its full parameter set, and
    the norm its budget is measured in ("Linf" attacks stay in the eps ball;
    "L2" attacks are minimum-norm and have no fixed budget)."""

    name: str
    attack_class: type
    params: Mapping[str, Any]
    norm: str
    description: str = ""

    def config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The preset's parameters with ``overrides`` applied and checked."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for attack {self.name!r}; "
                f"valid parameters: {sorted(self.params)}"
            )
        config = dict(self.params)
        for key, value in overrides.items():
            config[key] = _checked_value(self.name, key, self.params[key], value)
        return config


def _preset(name, attack_class, norm, description, **params) -> AttackPreset:
    return AttackPreset(name, attack_class, MappingProxyType(params), norm, description)


PRESETS: dict[str, AttackPreset] = {
    p.name: p
    for p in (
        _preset("fgsm", torchattacks.FGSM, "Linf", "FGSM, one signed-gradient step", eps=0.1),
        _preset("bim", torchattacks.BIM, "Linf", "BIM / iterative FGSM",
                eps=0.1, alpha=0.01, steps=10),
        _preset("pgd", torchattacks.PGD, "Linf", "PGD with uniform random start",
                eps=0.1, alpha=0.01, steps=40, random_start=True),
        _preset("cw", torchattacks.CW, "L2", "Carlini-Wagner L2 (no binary search over c)",
                c=1.0, kappa=0.0, steps=100, lr=0.01),
        _preset("deepfool", torchattacks.DeepFool, "L2", "DeepFool (minimum-norm, L2)",
                steps=50, overshoot=0.02),
        _preset("fgsm-low", torchattacks.FGSM, "Linf", "FGSM, low budget", eps=0.03),
        _preset("bim-low", torchattacks.BIM, "Linf", "BIM, low budget",
                eps=0.03, alpha=0.003, steps=10),
        _preset("pgd-low", torchattacks.PGD, "Linf", "PGD, low budget",
                eps=0.03, alpha=0.003, steps=40, random_start=True),
    )
}


def get_preset(name: str) -> AttackPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {list(PRESETS)}") from None


def attack_config(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full configuration ``make_attack(model, name, **overrides)`` uses."""
    return get_preset(name).config(overrides)


def make_attack(model: nn.Module, name: str, **overrides: Any) -> torchattacks.attack.Attack:
    """A configured torchattacks attack against ``model`` in inference mode.

    Raises ValueError for an unknown attack name or parameter, naming the
    valid choices.
    """
    preset = get_preset(name)
    config = preset.config(overrides)
    model.eval()
    attack = preset.attack_class(model, **config)
    # torchattacks defaults to eval already; say so explicitly, because the
    # decoupled network computes different gates in training mode.
    attack.set_model_training_mode(model_training=False, batchnorm_training=False, dropout_training=False)
    return attack


def run_attack(attack: torchattacks.attack.Attack, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Call ``attack`` and return only the adversarial images.

    Some torchattacks releases return ``(adv_images, target_labels)`` from
    DeepFool; 3.5.1 returns the images alone.  Accept both.
    """
    result = attack(images, labels)
    if isinstance(result, (tuple, list)):
        result = result[0]
    return result


def parse_override(name: str, key: str, text: str) -> Any:
    """Turn a command-line string into a value of the parameter's type."""
    preset = get_preset(name)
    if key not in preset.params:
        raise ValueError(f"unknown parameter {key!r} for attack {name!r}; valid parameters: {sorted(preset.params)}")
    default = preset.params[key]
    text = text.strip()
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        return float(text)
    except ValueError:
        raise ValueError(f"{name}.{key}={text!r}: expected a {type(default).__name__}") from None


def _checked_value(name: str, key: str, default: Any, value: Any) -> Any:
    """Keep the default's type (ints may stand in for floats) and refuse
    negative or non-finite budgets, step sizes and step counts (the config
    is stored as strict JSON, which has no NaN or infinity)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name}.{key} must be a bool, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}.{key} must be a number, got {value!r}")
    if isinstance(default, int) and not isinstance(value, int):
        if not float(value).is_integer():
            raise ValueError(f"{name}.{key} must be an integer, got {value!r}")
        value = int(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}.{key} must be a finite, non-negative number, got {value!r}")
    return type(default)(value)
