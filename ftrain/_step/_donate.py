"""Donation: a train step computed into its input state's memory, and the poisoned state left behind.

``train_step.donate(state, batch)`` runs :func:`donating` (the step with its results copied into
the input tensors), then :func:`hand_over` moves those tensors to a new state object and makes
every field of the old one raise :class:`DonatedStateError`. An eager step copies nothing back
(its new tensors exist already: writing them into the input saves no memory; a
``make_train_step`` step's optimizer update writes in place itself) and only :func:`retire` s
the input.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import tree
from .._state import TrainState
from ._checks import DonatedStateError, StepError

USED_AFTER_DONATION = (
    "this TrainState was donated to train_step.donate(...): its tensors now hold the next state. "
    "Use the state that call returned, or call train_step(state, batch) (pure) to keep the input"
)
SHARES_MEMORY = (
    "cannot donate this state: state.{path} shares memory with state.{other}, so writing the new values in place "
    "would corrupt one of them; clone one (tree.map(torch.clone, ...)) or use the pure train_step(state, batch)"
)


class _Donated:
    """What a donated state's fields hold: every use raises :class:`DonatedStateError`."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise DonatedStateError(USED_AFTER_DONATION)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # introspection (copy, pickle, doctest) probes dunders: not a use
            raise AttributeError(name)
        return self._fail()

    __getitem__ = __iter__ = __len__ = __bool__ = __int__ = __float__ = __index__ = _fail
    __add__ = __mul__ = __sub__ = __truediv__ = __eq__ = __array__ = _fail
    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return cls._fail(None)

    def __repr__(self) -> str:
        return "<donated>"


_DONATED = _Donated()
_LEAF_FIELDS: dict[type, dict[str, _Donated]] = {}  # per state class: its non-static fields -> _DONATED

TRUSTED: weakref.WeakSet = weakref.WeakSet()
"""States returned by ``.donate``: known not to alias, so the next donation skips :func:`check_no_aliasing`."""


def hand_over(state: Any) -> Any:
    """A new state object holding ``state``'s (now updated) tensors; ``state`` itself is poisoned."""
    if not _poisonable(state):
        leaves, spec = tree.flatten(state)
        return tree.unflatten(spec, leaves)
    # (A shallow copy: the fields' containers are shared, and only the new object can reach them.)
    new_state = object.__new__(type(state))
    new_state.__dict__.update(state.__dict__)
    retire(state)
    return new_state


def retire(state: Any) -> None:
    """Poison ``state`` (a donated input whose successor was computed elsewhere): every later use raises."""
    if not _poisonable(state):
        return
    poison = _LEAF_FIELDS.get(type(state))
    if poison is None:
        fields = (f.name for f in dataclasses.fields(state) if not f.metadata.get("static"))
        poison = _LEAF_FIELDS[type(state)] = dict.fromkeys(fields, _DONATED)
    state.__dict__.update(poison)


def _poisonable(state: Any) -> bool:
    return dataclasses.is_dataclass(state) and hasattr(state, "__dict__")


def check_alive(state: Any) -> None:
    """A :class:`DonatedStateError` if ``state`` was donated."""
    if isinstance(state, TrainState) and type(state.__dict__.get("step")) is _Donated:
        _DONATED._fail()


def check_no_aliasing(state: Any) -> None:
    """A :class:`StepError` if two tensor leaves of ``state`` share memory (writing one in place would
    corrupt the other)."""
    seen: dict[int, str] = {}
    paths, leaves, _ = tree.flatten_with_path(state)
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor):
            continue
        x = getattr(x, "_local_tensor", x)  # a DTensor's memory is its local shard
        if x.numel() == 0:
            continue
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            raise StepError(SHARES_MEMORY.format(path=path, other=seen[ptr]))
        seen[ptr] = path


def donating(core: Callable) -> Callable[[Any, Any], dict]:
    """``core`` as ``(state, batch) -> metrics`` that writes the new state into ``state``'s tensors."""

    def donating_step(state: Any, batch: Any) -> tuple[None, dict]:
        new_state, metrics = core(state, batch)
        # copy_ inside the compiled region lets inductor write results straight into the inputs.
        for old, new in zip(tree.traced_leaves(state), tree.traced_leaves(new_state)):
            if isinstance(old, torch.Tensor):
                old.copy_(new)
        return None, metrics

    def run(state: Any, batch: Any) -> dict:
        return donating_step(state, batch)[1]

    return run
