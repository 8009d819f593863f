"""Adversarial attack sets for evaluating PathGuard (docs/evaluation.md,
"Attacks").

``presets`` names the attacks of the protocol (and, in ``EXTRA_PRESETS``,
the reference DeepFool, the paper's DeepFool and the BPDA variants),
``generate`` runs them and stores the results, ``deepfool`` is the batched
DeepFool, ``bpda`` the attacks through the soft-gate surrogate, ``adaptive``
the detector-aware attack.
"""

from .bpda import BPDA, SoftGateSurrogate
from .deepfool import BatchedDeepFool
from .generate import AttackSet, generate_attack_set, load_attack_set, save_attack_set
from .presets import (
    ALL_PRESETS,
    EXTRA_PRESETS,
    PRESETS,
    AttackPreset,
    attack_config,
    make_attack,
)

__all__ = [
    "ALL_PRESETS", "BPDA", "EXTRA_PRESETS", "PRESETS", "AttackPreset", "AttackSet", "BatchedDeepFool",
    "SoftGateSurrogate", "attack_config", "generate_attack_set", "load_attack_set", "make_attack", "save_attack_set",
]
