"""Argument checks shared by every public entry point, with one wording for each kind of mistake.

Each check names the caller (``who``) and the argument, says what was passed, and returns the
value, so a constructor reads ``self.keep = check_int(keep, "keep", who="CheckpointManager")``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

__all__ = ["ArgumentTypeError", "check_int", "check_number", "check_one_of"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: both a TypeError and a ValueError, so either ``except`` catches it."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_kind(low: int | None) -> str:
    if low == 1:
        return "a positive int"
    if low == 0:
        return "a non-negative int"
    return "an int" if low is None else f"an int >= {low}"


def check_int(value: Any, name: str, *, who: str, low: int | None = 1, none_ok: bool = False, hint: str = "") -> Any:
    """``value`` if it is an int (not a bool) ``>= low`` (or None when ``none_ok``); else a ValueError
    (an :class:`ArgumentTypeError` when it is no int at all).

    >>> check_int(3, "keep", who="CheckpointManager")
    3
    >>> check_int(0, "keep", who="CheckpointManager", none_ok=True)
    Traceback (most recent call last):
    ValueError: CheckpointManager: keep must be a positive int or None, got 0
    """
    if value is None and none_ok:
        return value
    if not _is_int(value) or (low is not None and value < low):
        kind = _int_kind(low) + (" or None" if none_ok else "")
        error = ValueError if _is_int(value) else ArgumentTypeError
        raise error(f"{who}: {name} must be {kind}{hint}, got {value!r}")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    who: str,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    none_ok: bool = False,
) -> Any:
    """``value`` if it is a finite real number (not a bool) inside the given bounds; else a ValueError.

    Bounds are inclusive unless ``open_low``/``open_high``.

    >>> check_number(0.5, "beta", who="lr_find", low=0, high=1, open_high=True)
    0.5
    >>> check_number(1.0, "beta", who="lr_find", low=0, high=1, open_high=True)
    Traceback (most recent call last):
    ValueError: lr_find: beta must be in [0, 1), got 1.0
    """
    if value is None and none_ok:
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        if low is not None and high is not None:
            where = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            where = f" {'>' if open_low else '>='} {low}"
        elif high is not None:
            where = f" {'<' if open_high else '<='} {high}"
        else:
            where = ""
        # A stated bound says "a number" already: "beta must be in [0, 1)", "lr must be >= 0".
        kind = "a positive number" if (low == 0 and open_low and high is None) else where.strip() or "a number"
        error = ValueError if is_number else ArgumentTypeError
        raise error(f"{who}: {name} must be {kind}{' or None' if none_ok else ''}, got {value!r}")
    return value


def check_one_of(value: Any, name: str, choices: Collection[Any], *, who: str) -> Any:
    """``value`` if it is one of ``choices``; else a ValueError listing them.

    >>> check_one_of("max", "mode", ("min", "max"), who="EarlyStopping")
    'max'
    >>> check_one_of("up", "mode", ("min", "max"), who="EarlyStopping")
    Traceback (most recent call last):
    ValueError: EarlyStopping: mode must be one of 'min', 'max', got 'up'
    """
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{who}: {name} must be one of {listed}, got {value!r}")
    return value
