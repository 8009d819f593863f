"""Options of a job: one dataclass field each, with its help text.

``option(default, "help", choices=..., minimum=...)`` is a dataclass field
whose metadata the CLI turns into an argparse option (pathguard/cli.py) and
``check(cfg)`` validates, so a job gets the same checks whether it is run
from the command line or from Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pathguard.detector.bundle import DEFAULT_BUNDLE
from pathguard.detector.data import DATASETS
from pathguard.detector.devices import DEVICES

DEFAULT_BUNDLE_TEXT = str(DEFAULT_BUNDLE)


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           kind: type | None = None, flag: str | None = None, repeat: bool = False, empty: bool = False):
    """A job option.  ``kind`` is the value type when the default does not
    show it (None defaults, tuples); ``flag`` replaces the option's
    --field-name; ``repeat`` makes a tuple option repeatable (--set a --set b)
    instead of taking several values after one flag; ``empty`` lets a tuple
    option's flag stand alone for none."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "kind": kind, "flag": flag, "repeat": repeat,
            "empty": empty}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple for a list-valued option")
    return dataclasses.field(default=default, metadata=meta)


def value_kind(f: dataclasses.Field) -> type:
    kind = f.metadata.get("kind")
    if kind is not None:
        return kind
    if isinstance(f.default, tuple):
        return type(f.default[0]) if f.default else str
    return type(f.default)


def check(cfg) -> None:
    """Refuse option values outside their choices or below their minimum."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        for v in values:
            if v is None:
                continue
            if choices is not None and v not in choices:
                raise ValueError(f"{f.name.replace('_', '-')}: {v!r} is not one of {list(choices)}")
            if minimum is not None and v < minimum:
                raise ValueError(f"{f.name.replace('_', '-')}: must be >= {minimum}, got {v}")


def as_json(cfg) -> dict:
    """The configuration as JSON (tuples become lists), for reports."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


@dataclasses.dataclass
class BundleOptions:
    """The options of every command that reads a bundle and its data."""

    bundle: str = option(DEFAULT_BUNDLE_TEXT, "bundle directory")
    dataset: str | None = option(None, "dataset (default: the one the bundle was trained on)", kind=str,
                                 choices=DATASETS)
    data_root: str | None = option(None, "dataset directory (default: the bundle's)", kind=str)


def device_option():
    """The --device option of the jobs that run networks on many images."""
    return option("auto", "where the networks run: auto (the GPU if PyTorch sees one), cpu or cuda",
                  choices=DEVICES)
