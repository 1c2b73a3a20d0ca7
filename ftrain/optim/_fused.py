"""Eager fast paths for the named optimizers: update and apply in one go, with torch.optim's kernels.

A named optimizer is a chain of blocks, and each block flattens the trees, computes out of place
and rebuilds them; then :func:`apply_updates` adds the result to the params. Eager, on a small
model that Python and those allocations cost more than the arithmetic (about twice
``torch.optim.AdamW``'s foreach step on a 44k-parameter MLP). A *fused apply* is the same step
written as ``torch.optim``'s ``_multi_tensor_*`` function writes it: the trees flattened once,
the same foreach kernels in the same order, so its results are bitwise ``torch.optim``'s
(``foreach=True``). Being pure, it allocates only the new params and optimizer state.

``fused_apply(grads, opt_state, params)`` returns ``(new_params, new_opt_state)`` with the
chain's state structure exactly (same NamedTuples, same tensors' dtypes), or ``None`` when it
cannot serve the call: under ``torch.compile`` (inductor fuses the chain already), ``torch.func``
transforms or a dispatch mode, off the host (reading the step count would wait for the device),
or when a leaf is not a plain tensor of its param's dtype. Then the caller runs the chain.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .. import tree
from ..tree import PyTree
from ._base import ScalarOrSchedule, foreach_leaves
from ._report import report, report_learning_rate
from ._transform import ScaleByAdamState, ScaleByScheduleState, TraceState

FusedApply = Callable[[PyTree, Any, PyTree], tuple[PyTree, Any] | None]

_WRITABLE: list[frozenset[int]] = []  # the tensors (by id) the innermost updating_in_place() gave over


@contextlib.contextmanager
def updating_in_place(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, an eager fused update writes its results into the ``tensors`` it replaces.

    For a donated state, whose old values nobody reads again: the params and optimizer state the
    update would allocate anew (and any input read after it) are ``tensors`` it may overwrite,
    so it writes into them as ``torch.optim`` does, with the same kernels: the same bits, no
    allocation. An update whose params or moments are not all among ``tensors`` computes out
    of place as usual. ``TrainStep.donate`` uses it when the step is eager.

    Example:
        >>> import torch
        >>> from ftrain import optim
        >>> tx, p = optim.sgd(0.5), {"w": torch.ones(2)}
        >>> w = p["w"]
        >>> with optim.updating_in_place([w]):
        ...     new, _ = tx.fused_apply({"w": torch.ones(2)}, tx.init(p), p)
        >>> new["w"] is w, w
        (True, tensor([0.5000, 0.5000]))
    """
    _WRITABLE.append(frozenset(map(id, tensors)))
    try:
        yield
    finally:
        _WRITABLE.pop()


def _writable(*columns: list[torch.Tensor]) -> bool:
    return bool(_WRITABLE) and _WRITABLE[-1].issuperset(map(id, itertools.chain(*columns)))


def _foreach(op: str, in_place: bool, xs: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """``torch._foreach_<op>_`` on ``xs`` (returned) when ``in_place``, else ``torch._foreach_<op>``'s new list."""
    if in_place:
        getattr(torch, f"_foreach_{op}_")(xs, *args, **kwargs)
        return xs
    return getattr(torch, f"_foreach_{op}")(xs, *args, **kwargs)


def _leaf_lists(params: PyTree, *trees: PyTree) -> tuple[list[list[torch.Tensor]], Any] | None:
    """The trees' leaves as lists, or ``None`` unless every leaf is a plain tensor of its param's dtype."""
    try:
        found = foreach_leaves(params, *trees)
    except ValueError:  # a tree shaped unlike the params (the chain's error says where)
        return None
    if found is None:
        return None
    columns, _ = found
    dtypes = list(map(_DTYPE, columns[0]))
    # (a subtree where the params hold a leaf is not a tensor: caught here too. Mapped, not a
    # generator per leaf: this runs every eager step, over every leaf of 3-5 trees.)
    if set(map(type, itertools.chain(*columns))) == {torch.Tensor} and all(
        list(map(_DTYPE, column)) == dtypes for column in columns[1:]
    ):
        return found
    return None


_DTYPE = operator.attrgetter("dtype")


class _LearningRate:
    """A named optimizer's learning rate on the host: a float, or a schedule of the chain's count."""

    def __init__(self, learning_rate: ScalarOrSchedule) -> None:
        self.schedule = learning_rate if callable(learning_rate) else None
        self.value = None if callable(learning_rate) else float(learning_rate)

    def counts(self, lr_state: Any) -> tuple[torch.Tensor, ...]:
        return (lr_state.count,) if self.schedule is not None else ()

    def read(self, lr_state: Any, like: torch.Tensor) -> float:
        """This step's rate, reported as ``"lr"`` as the chain's ``scale_by_learning_rate`` does."""
        if self.schedule is None:
            report_learning_rate(self.value, like)
            return self.value
        value = torch.as_tensor(self.schedule(lr_state.count))
        report("lr", value)
        return value.item()

    def next_state(self, lr_state: Any) -> Any:
        return ScaleByScheduleState(lr_state.count + 1) if self.schedule is not None else lr_state


def _is_chain_state(opt_state: Any, size: int) -> bool:
    # Anything else (another optimizer's state) goes to the chain, whose error says what to do.
    return type(opt_state) is tuple and len(opt_state) == size


def _replaced(opt_state: tuple, changes: dict[int, Any]) -> tuple:
    return tuple(changes.get(i, s) for i, s in enumerate(opt_state))


def adam_apply(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    *,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    index: int,
    size: int,
) -> FusedApply:
    """Adam/AdamW as ``torch.optim``'s ``_multi_tensor_adam``, for a chain of ``size`` blocks whose Adam
    state is ``opt_state[index]`` and whose learning-rate state is last."""
    rate = _LearningRate(learning_rate)

    def fused_apply(grads: PyTree, opt_state: tuple, params: PyTree) -> tuple[PyTree, tuple] | None:
        if not _is_chain_state(opt_state, size):
            return None
        adam, lr_state = opt_state[index], opt_state[-1]
        if not tree.host_readable(adam.count, *rate.counts(lr_state)):
            return None
        moments = (adam.mu, adam.nu, adam.nu_max) if amsgrad else (adam.mu, adam.nu)
        found = _leaf_lists(params, grads, *moments)
        if found is None:
            return None
        (p, g, m, v, *v_max), spec = found
        in_place = _writable(p, m, v, *v_max)
        lr = rate.read(lr_state, p[0])
        count = adam.count + 1
        t = float(count.item())
        if maximize:
            g = torch._foreach_neg(g)
        if weight_decay != 0 and not decoupled:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        m = _foreach("lerp", in_place, m, g, 1 - b1)
        v = _foreach("mul", in_place, v, b2)
        torch._foreach_addcmul_(v, g, g, 1 - b2)
        step_size = (lr / (1 - b1**t)) * -1
        if amsgrad:
            v_max = _foreach("maximum", in_place, v_max[0], v)
        denom = torch._foreach_sqrt(v_max if amsgrad else v)
        torch._foreach_div_(denom, (1 - b2**t) ** 0.5)
        torch._foreach_add_(denom, eps)
        if weight_decay != 0 and decoupled:
            p = _foreach("mul", in_place, p, 1 - lr * weight_decay)
            torch._foreach_addcdiv_(p, m, denom, step_size)
        else:
            p = _foreach("addcdiv", in_place, p, m, denom, step_size)
        nu_max = tree.unflatten(spec, v_max) if amsgrad else ()
        new_adam = ScaleByAdamState(count, tree.unflatten(spec, m), tree.unflatten(spec, v), nu_max)
        new_state = _replaced(opt_state, {index: new_adam, len(opt_state) - 1: rate.next_state(lr_state)})
        return tree.unflatten(spec, p), new_state

    return fused_apply


def sgd_apply(
    learning_rate: ScalarOrSchedule,
    momentum: float,
    nesterov: bool,
    *,
    weight_decay: float,
    maximize: bool,
    index: int | None,
    size: int,
) -> FusedApply:
    """SGD as ``torch.optim``'s ``_multi_tensor_sgd`` (dampening 0), for a chain of ``size`` blocks whose
    momentum state is ``opt_state[index]`` (``None``: no momentum) and whose learning-rate state is last."""
    rate = _LearningRate(learning_rate)

    def fused_apply(grads: PyTree, opt_state: tuple, params: PyTree) -> tuple[PyTree, tuple] | None:
        if not _is_chain_state(opt_state, size):
            return None
        lr_state = opt_state[-1]
        if rate.schedule is not None and not tree.host_readable(lr_state.count):
            return None
        found = _leaf_lists(params, grads, *(() if index is None else (opt_state[index].trace,)))
        if found is None:
            return None
        (p, g, *buf), spec = found
        in_place = _writable(p, *buf)
        lr = rate.read(lr_state, p[0])
        if maximize:
            g = torch._foreach_neg(g)
        if weight_decay != 0:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        changes = {len(opt_state) - 1: rate.next_state(lr_state)}
        if index is not None:
            # torch's first buffer is a copy of the gradient; ours starts at zero: 0 * momentum + g is g.
            buf = _foreach("mul", in_place, buf[0], momentum)
            torch._foreach_add_(buf, g)
            changes[index] = TraceState(tree.unflatten(spec, buf))
            g = torch._foreach_add(g, buf, alpha=momentum) if nesterov else buf
        p = _foreach("add", in_place, p, g, alpha=-lr)
        return tree.unflatten(spec, p), _replaced(opt_state, changes)

    return fused_apply
