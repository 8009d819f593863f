"""Adversarial attack sets for evaluating PathGuard (docs/evaluation.md,
"Attacks").

``presets`` names the attacks of the protocol, ``generate`` runs them and
stores the results, ``cli`` is the ``pathguard attack`` command.
"""

from .generate import AttackSet, generate_attack_set, load_attack_set, save_attack_set
from .presets import PRESETS, AttackPreset, attack_config, make_attack

__all__ = [
    "PRESETS", "AttackPreset", "AttackSet", "attack_config", "generate_attack_set",
    "load_attack_set", "make_attack", "save_attack_set",
]
