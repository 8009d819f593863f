"""Attack sets an earlier evaluation saved (``--save-attacks DIR``), reused
by a later one (``--attacks-from DIR``).

Generating the protocol's attack sets is most of an evaluation's time (CW and
DeepFool above all), yet they depend only on the model, the images, the
attack settings and the seed: not on the detector.  A detector refitted or
recalibrated on the same model can be evaluated on the very same adversarial
examples, which also makes the comparison exact.

A saved set is reused only when it is provably the set this run would make:
same attack, settings and seed, the same original images and labels in the
same order, and made against the same model (``Bundle.model_digest``, the
digest of the files that define the decoupled model's answers; a refit
leaves it unchanged).  A saved set that differs in any of these is refused
with the reason, never silently regenerated or used; a set that is not
there is generated as usual.

Layout: ``DIR/<attack>`` for the test attacks, ``DIR/supervised/<attack>``
for those the supervised detectors are trained on (pathguard attack's
format, attacks/generate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pathguard.attacks.generate import METADATA_FILE, AttackSet, load_attack_set
from pathguard.attacks.presets import attack_config


def set_folder(root: str | Path, key: str) -> Path:
    """Where the attack set of task ``key`` ("test:<attack>" or
    "supervised:<attack>") lives under ``root``."""
    kind, name = key.split(":", 1)
    return Path(root) / name if kind == "test" else Path(root) / "supervised" / name


def _same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def mismatches(aset: AttackSet, task: tuple, model_digest: str) -> list[str]:
    """Why ``aset`` is not the set ``task`` = (images, labels, attack, seed,
    overrides) would make against the model of ``model_digest`` (empty: it
    is)."""
    images, labels, name, seed, overrides = task
    problems = []
    if aset.attack != name:
        problems.append(f"attack {aset.attack!r}, this run's is {name!r}")
    config = attack_config(name, overrides)
    if not _same_json(aset.config, config):
        problems.append(f"settings {json.dumps(aset.config, sort_keys=True)}, this run's are "
                        f"{json.dumps(config, sort_keys=True)}")
    if aset.seed != seed:
        problems.append(f"seed {aset.seed}, this run's is {seed}")
    saved_model = (aset.source or {}).get("model_digest")
    if not saved_model:
        problems.append("it does not record the model it was made against (saved before attack sets recorded "
                        "model_digest): generate it again")
    elif saved_model != model_digest:
        problems.append(f"made against another model (model digest {saved_model[:12]}..., this bundle's is "
                        f"{model_digest[:12]}...)")
    if aset.original.shape != images.shape or not torch.equal(aset.original, images.to(aset.original.dtype)):
        problems.append(f"other original images ({len(aset.original)} saved, {len(images)} in this run, or the "
                        f"same number but different pixels or order)")
    elif not torch.equal(aset.labels, labels.to(aset.labels.dtype)):
        problems.append("other labels for the same images")
    return problems


def reusable_sets(root: str | Path, tasks: dict[str, tuple], model_digest: str) -> dict[str, AttackSet]:
    """The saved sets under ``root`` for ``tasks`` ({key: (images, labels,
    attack, seed, overrides)}), each checked to be exactly the set the task
    would make.  Raises ValueError naming the set and every difference when
    a saved one is not; tasks with no saved set are left out (generated)."""
    if not Path(root).is_dir():
        raise ValueError(f"--attacks-from {root}: no such directory")
    if not model_digest:
        raise ValueError("--attacks-from needs a bundle loaded with its manifest verified (its model digest)")
    reused = {}
    for key, task in tasks.items():
        folder = set_folder(root, key)
        if not (folder / METADATA_FILE).is_file():
            continue
        aset = load_attack_set(folder)
        problems = mismatches(aset, task, model_digest)
        if problems:
            raise ValueError(f"{folder}: not the {key} attack set of this run: " + "; ".join(problems))
        reused[key] = aset
    return reused
