"""Ensembles: N states stacked into one for ``torch.func.vmap``, and back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import tree
from .._state import TrainState
from ._checks import describe
from ._donate import check_alive


def stack_states(states: list[TrainState]) -> TrainState:
    """Stack same-shaped states leaf by leaf into one state for ``torch.func.vmap(train_step)``.

    States built separately (different seeds, separately built optimizers) stack as long as
    their leaves match; the first state's ``apply_fn`` and ``tx`` are kept.

    Example:
        >>> import torch, ftrain
        >>> states = [ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity(),
        ...                                    key=ftrain.random.key(s)) for s in range(3)]
        >>> ftrain.stack_states(states).params["weight"].shape
        torch.Size([3, 1, 2])
    """
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state, got an empty list")
    flat = [tree.flatten_with_path(s) for s in states]
    paths0, leaves0, spec = flat[0]
    for i, (paths, leaves, _) in enumerate(flat[1:], start=1):
        if paths != paths0:
            raise ValueError(f"stack_states: states[{i}] has leaves {paths} but states[0] has {paths0}")
        for path, a, b in zip(paths, leaves0, leaves):
            if describe(a) != describe(b):
                raise ValueError(
                    f"stack_states: states[{i}].{path} is {describe(b)} but states[0].{path} is {describe(a)}"
                )
    # Stacked as lists of leaves, not as states: separately built optimizers differ in the static
    # fields (their functions), which would make the states' structures differ.
    return tree.unflatten(spec, tree.stack([leaves for _, leaves, _ in flat]))


def vmap_step(step: Callable[[Any, Any], Any], *, randomness: str = "error") -> Callable[[Any, Any], Any]:
    """``torch.func.vmap`` of a step over a stacked state and a stacked batch (an ensemble).

    Non-tensor leaves of the state (an optimizer's ``None`` placeholders) are passed through
    unbatched, which plain ``torch.func.vmap(train_step)`` cannot do. Keyed dropout needs no
    ``randomness`` flag (each member draws from its own key); use ``randomness="different"``
    only for a model that calls torch's global RNG. Wrap the result in :func:`compile_step` to
    compile the whole ensemble step as one graph.

    Example:
        >>> import torch, ftrain
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     return apply(params, buffers, batch)[0].square().mean()
        >>> states = [ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1),
        ...                                    key=ftrain.random.key(s)) for s in range(4)]
        >>> step = ftrain.vmap_step(ftrain.make_train_step(loss_fn, compile=False))
        >>> ensemble, metrics = step(ftrain.stack_states(states), torch.ones(4, 8, 2))
        >>> metrics["loss"].shape
        torch.Size([4])
    """

    def ensemble_step(state: Any, batch: Any) -> Any:
        # vmap flattens with torch's pytree, so the in/out dims are a torch-pytree twin of the state.
        state_dims = tree.traced_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, state)
        batched = torch.func.vmap(step, in_dims=(state_dims, 0), out_dims=(state_dims, 0), randomness=randomness)
        return batched(state, batch)

    return ensemble_step


def unstack_state(state: TrainState) -> list[TrainState]:
    """Split a stacked state (from :func:`stack_states`) back into a list of states.

    Example:
        >>> import torch, ftrain
        >>> s = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
        >>> len(ftrain.unstack_state(ftrain.stack_states([s, s])))
        2
    """
    check_alive(state)
    return tree.unstack(state)
