"""ftrain's version, read once from the installed metadata (pyproject.toml is the one source of truth).

A module of its own, at the bottom of the layers, so that code inside the package (the checkpoint
metadata) can read it without importing the package's ``__init__``.

>>> VERSION == __import__("ftrain").__version__
True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["VERSION"]

try:
    VERSION: str = version("ftrain")
except PackageNotFoundError:  # a source tree run without installing: no stale literal
    VERSION = "0+unknown"
