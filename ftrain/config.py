"""Typed run configs: a dataclass, filled from a YAML file and then from command-line overrides.

``parse(Config)`` reads ``--config file.yaml`` (optional), checks that every key in it is a
field of ``Config``, and hands the rest of the command line to `tyro
<https://brentyi.github.io/tyro/>`_, which builds the dataclass with the file's values as
defaults: ``--batch-size 32`` overrides ``batch_size: 64`` from the file, field docstrings
become the ``--help``, booleans are flags (``--no-compile``). tyro rather than jsonargparse:
tyro spells flags with dashes and booleans as flags, so scripts keep the flags they had, and
it builds the dataclass itself (jsonargparse would make them ``--batch_size`` and
``--no_compile true``). Install with ``pip install 'ftrain[config]'`` (tyro and PyYAML,
imported on first use).

:func:`to_dict` gives the resolved config as a JSON-able dict: pass it as
``CheckpointManager(config=...)`` (saved with every step) and ``fit(hparams=...)`` (written to
the writers).

Example:
    >>> import dataclasses, pathlib, tempfile
    >>> @dataclasses.dataclass
    ... class Config:
    ...     lr: float = 1e-3
    ...     '''peak learning rate'''
    ...     batch_size: int = 64
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
    >>> _ = path.write_text("lr: 0.01\\nbatch_size: 128\\n")
    >>> parse(Config, ["--config", str(path), "--batch-size", "32"])
    Config(lr=0.01, batch_size=32)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["load_yaml", "parse", "to_dict"]

T = TypeVar("T")

UNKNOWN_KEYS = "{path}: {keys} {verb} not a field of {name}; its fields are {fields}. Fix the spelling or remove it"


def _fields(cls: type) -> list[str]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"ftrain.config: the config must be a dataclass type, got {cls!r}")
    return [f.name for f in dataclasses.fields(cls) if f.init]


def load_yaml(cls: type[T], path: str) -> T:
    """``cls`` built from the YAML mapping in ``path``; a key that is not a field of ``cls`` is an error naming it.

    Fields missing from the file keep their defaults.
    """
    import yaml

    fields = _fields(cls)
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of field: value, got {type(values).__name__}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        verb = "is" if len(unknown) == 1 else "are"
        raise ValueError(UNKNOWN_KEYS.format(path=path, keys=unknown, verb=verb, name=cls.__name__, fields=fields))
    return cls(**values)


def parse(cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None) -> T:
    """``cls`` from ``--config file.yaml`` (if given) overridden by the other command-line flags.

    Args:
        cls: the config dataclass (its defaults are the defaults of the flags).
        argv: the command line without the program name (default: ``sys.argv[1:]``).
        description: the ``--help`` text (default: ``cls``'s docstring).
    """
    import tyro

    _fields(cls)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    default = load_yaml(cls, known.config) if known.config else None
    text = description if description is not None else (cls.__doc__ or "")
    text += "\n\n--config FILE.yaml sets any of the fields below first; the flags override the file."
    return tyro.cli(cls, args=rest, default=default, description=text)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (``dataclasses.asdict``), for checkpoints and writers.

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Config:
    ...     lr: float = 1e-3
    >>> to_dict(Config())
    {'lr': 0.001}
    """
    return dataclasses.asdict(config)
