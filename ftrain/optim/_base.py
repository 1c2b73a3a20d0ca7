"""The optimizer protocol: a pair of pure functions, as in optax."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import tree
from .._validate import check_number
from ..tree import PyTree

Schedule = Callable[[torch.Tensor], torch.Tensor]
"""A function of the step count (a 0-d int64 tensor) returning a 0-d tensor; see :mod:`ftrain.schedules`."""

Scalar = float | torch.Tensor
"""A hyperparameter: a Python float, or a 0-d tensor once :func:`inject_hyperparams` holds it in the state."""

ScalarOrSchedule = Scalar | Schedule
"""A hyperparameter that may also follow a :data:`Schedule` of the step count (e.g. a learning rate)."""


class GradientTransformation(NamedTuple):
    """An optimizer, or one building block of one: two pure functions.

    ``init(params) -> state`` builds the optimizer state (a pytree of tensors).
    ``update(updates, state, params=None) -> (updates, state)`` turns gradients
    into updates; :func:`apply_updates` adds them to the params. Neither mutates
    its inputs, so a transformation is safe to call inside ``torch.compile`` and
    ``torch.func.vmap``.

    ``fused_apply(grads, state, params) -> (new_params, state) | None``, optional, is
    the same step with the updates applied, in ``torch.optim``'s own foreach kernels
    (eager only: it returns ``None`` when it cannot serve a call, and the caller then
    runs ``update`` and :func:`apply_updates`). :meth:`ftrain.TrainState.apply_gradients`
    uses it; the named Adam, AdamW and SGD fill it, a :func:`chain` ending in one of them
    too (``chain(clip_by_global_norm(1.0), adamw(1e-3))``); a wrapper has none.

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
    fused_apply: Callable[..., tuple[PyTree, PyTree] | None] | None = None


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


def identity() -> GradientTransformation:
    """Pass updates through unchanged (keeps no state)."""
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    >>> import torch
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

    def run(ts, updates, state, params):
        # (A plain tuple: another optimizer's state, a NamedTuple, would pass a length check.)
        if type(state) is not tuple or len(state) != len(transforms):
            got = f"a tuple of {len(state)} states" if type(state) is tuple else type(state).__name__
            raise ValueError(
                f"chain of {len(transforms)} transformations got {got}; pass the state its own init() built "
                "(was the optimizer changed after the state was created or restored?)"
            )
        new_state = []
        for t, s in zip(ts, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, new_state

    def update(updates, state, params=None):
        updates, new_state = run(transforms, updates, state, params)
        return updates, tuple(new_state)

    def fused_apply(grads, state, params):
        # The last transformation applies itself (eager only): the others' updates are its gradients.
        if not tree.host_readable():
            return None
        updates, new_state = run(transforms[:-1], grads, state, params)
        applied = last.fused_apply(updates, state[-1], params)
        if applied is None:
            last_updates, last_state = last.update(updates, state[-1], params)
            applied = apply_updates(params, last_updates), last_state
        return applied[0], (*new_state, applied[1])

    last = transforms[-1] if transforms else None
    return GradientTransformation(init, update, fused_apply if last is not None and last.fused_apply else None)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leaf by leaf, out of place; each result keeps its param's dtype.

    >>> import torch
    >>> apply_updates({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
    tensor([2., 2.])
    """
    lists = foreach_leaves(params, updates, check=True)  # (checks the structures on the way)
    if lists is not None and all(p.dtype == u.dtype for p, u in zip(*lists[0])):
        (p, u), spec = lists
        return tree.unflatten(spec, torch._foreach_add(p, u))
    tree.assert_same_structure(params, updates, names=["params", "updates"])
    return tree.map(lambda p, u: (p + u).to(p.dtype), params, updates)


# --- shared helpers for the building blocks -------------------------------------------------

SCALAR_DTYPE = torch.float64
"""Dtype for scalar bookkeeping (bias corrections, schedule values): float64 so the
numbers match torch.optim's Python-float arithmetic; cast to each leaf's dtype on use."""


def is_tensor_hyperparam(value: Any) -> bool:
    """True for a tensor hyperparameter (set by ``inject_hyperparams``): it cannot be checked without a host sync."""
    return isinstance(value, torch.Tensor)


def check_hyperparam(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = math.inf,
    high_open: bool = False,
    low_open: bool = False,
) -> None:
    """Raise a clear ``ValueError`` if a Python-number hyperparameter is out of ``[low, high]``.

    Tensors (injected hyperparameters) and schedules are not checked: reading them would
    sync the host; their initial values were checked when the optimizer was built.

    >>> check_hyperparam("adam", "b1", 1.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ValueError: adam: b1 must be in [0.0, 1.0), got 1.0
    """
    if is_tensor_hyperparam(value) or callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float (or a tensor/schedule), got {value!r}")
    check_number(value, name, who=owner, low=low, high=high, open_low=low_open, open_high=high_open)


def foreach_leaves(
    *trees: PyTree, scalars: tuple = (), check: bool = False
) -> tuple[list[list[torch.Tensor]], Any] | None:
    """The leaves of same-structured ``trees`` as lists for torch's ``_foreach_*`` kernels, and the
    structure to rebuild them with, or ``None`` to compute leaf by leaf.

    Eager, one foreach kernel does for all leaves what a per-leaf op does one leaf at a time (the
    per-leaf dispatch dominates a small model's optimizer step, as it does in ``torch.optim``,
    whose default is foreach). ``None`` under ``torch.compile`` (inductor fuses the per-leaf code
    into the step's kernels already) or ``torch.func`` transforms, when a leaf is not a tensor, or when one of ``scalars`` (the
    hyperparameters the caller uses) is a tensor (an injected hyperparameter). With ``check``,
    ``None`` too when the trees' structures differ (the caller's slow path then says how).
    """
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return None  # (and under vmap: foreach kernels have no batching rule)
    if any(is_tensor_hyperparam(x) for x in scalars):
        return None
    leaves, spec = tree.flatten(trees[0])
    if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        return None
    if check and any(tree.structure(t) != spec for t in trees[1:]):
        return None
    return [leaves, *(spec.flatten_up_to(t) for t in trees[1:])], spec


def cast_like(value: Any, like: torch.Tensor) -> Any:
    """``value`` as a scalar usable with leaf ``like``: tensors are cast to its dtype, floats pass through."""
    if isinstance(value, torch.Tensor) and value.dtype != like.dtype:
        return value.to(like.dtype)
    return value


def zero_count(params: PyTree) -> torch.Tensor:
    """A fresh step count: a 0-d int64 tensor on the params' device (a tensor, so it never recompiles)."""
    return torch.zeros((), dtype=torch.int64, device=tree.device_of(params))


def need_params(owner: str, params: PyTree) -> None:
    """Raise if a transform that reads the params was called without them."""
    if params is None:
        raise ValueError(f"{owner} needs the current params: call tx.update(grads, opt_state, params)")


_REALIZE_WIDTH = 16  # wider than inductor's unroll_reductions_threshold (8), so the reduction stays a kernel


def materialize(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Compute 0-d bookkeeping tensors once per step instead of once per element.

    Under ``torch.compile``, inductor inlines cheap scalar math (``b1 ** t``, a cosine
    schedule) into every elementwise kernel that reads it, so it is recomputed for each
    element of each parameter: measured 3-4x slower Adam updates on CPU. A max over a few
    copies of each value is a real reduction, so inductor computes it once, and it is exact.
    Eager mode returns the inputs unchanged.
    """
    if not torch.compiler.is_compiling() or not scalars:
        return scalars
    stacked = torch.stack([s.to(SCALAR_DTYPE) for s in scalars])
    realized = stacked.unsqueeze(-1).expand(len(scalars), _REALIZE_WIDTH).amax(-1)
    return tuple(realized.unbind(0))
