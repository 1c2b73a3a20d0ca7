"""The optimizer protocol: a pair of pure functions, as in optax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .. import tree

PyTree = Any


class GradientTransformation(NamedTuple):
    """An optimizer, or one building block of one: two pure functions.

    ``init(params) -> state`` builds the optimizer state (a pytree of tensors).
    ``update(updates, state, params=None) -> (updates, state)`` turns gradients
    into updates; :func:`apply_updates` adds them to the params. Neither mutates
    its inputs, so a transformation is safe to call inside ``torch.compile`` and
    ``torch.func.vmap``.

    Example:
        >>> import torch
        >>> from ftrain import optim
        >>> tx = optim.identity()
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = tx.update({"w": torch.full((2,), -0.5)}, tx.init(params), params)
        >>> optim.apply_updates(params, updates)["w"]
        tensor([0.5000, 0.5000])
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


def identity() -> GradientTransformation:
    """Pass updates through unchanged (keeps no state)."""
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    >>> tx = chain(identity(), identity())
    >>> tx.init({"w": torch.ones(1)})
    (EmptyState(), EmptyState())
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain() argument {i} is a {type(t).__name__}, expected a GradientTransformation "
                "(e.g. optim.adam(1e-3) or optim.clip_by_global_norm(1.0))"
            )

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf, out of place; each result keeps its param's dtype.

    >>> apply_updates({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
    tensor([2., 2.])
    """
    tree.assert_same_structure(params, updates, names=["params", "updates"])
    return tree.map(lambda p, u: (p + u).to(p.dtype), params, updates)
