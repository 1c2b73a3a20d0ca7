"""What a step checks, and how it says what went wrong: the step errors and their messages.

The loss/metric checks run only on a step's first call (on fake tensors before compiling, or on
the real ones when eager), never inside a compiled graph: :func:`checking` tells the step's
pure parts whether they are in that call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .. import tree


class StepError(ValueError):
    """A step was given something it cannot run: the message says what and how to fix it."""


class DonatedStateError(RuntimeError):
    """A state was used after it was donated to ``train_step.donate``."""


NOT_DIFFERENTIABLE = (
    "the loss does not depend on the params (it is not differentiable w.r.t. them), so every gradient "
    "would be zero: compute it from apply(params, ...) with the params loss_fn receives, without "
    ".detach(), .item(), argmax or integer ops on the path"
)
NOT_A_SCALAR = (
    "loss_fn returned a {name} of shape {shape}; it must be a scalar (0-d tensor): reduce it, e.g. loss.mean()"
)
METRIC_NOT_A_SCALAR = (
    "metric {name!r} has shape {shape}; metrics must be scalars (0-d tensors): reduce it, e.g. .mean()"
)
LEAF_CHANGED = (
    "the step changed state.{path} from {before} to {after}; a leaf must keep its shape and dtype, "
    "or every step would compile a new graph"
)
STATIC_CHANGED = (
    "the state returned has different static fields (apply_fn/tx) than the one passed in; a step may only change leaves"
)

LOST_BUFFERS = (
    "loss_fn returned the loss without the new buffers, but apply(...) updated the buffers of {owners}: {names}; "
    "the state would silently keep the old ones (e.g. BatchNorm's running statistics). Return what apply gives "
    "back: `out, new_buffers = apply(params, buffers, x, key=key)` ... `return loss, metrics, new_buffers` "
    "(to keep the old buffers on purpose, return a copy: dict(buffers))"
)

# Set only while a step is checked (see the module docstring): the checks are then plain Python
# on shapes and flags, and are never traced into a compiled graph.
_CHECKING = False


def checking() -> bool:
    """Is this the checked first call of a step (so the loss and metrics are to be checked)?"""
    return _CHECKING


@contextlib.contextmanager
def checks(on: bool = True) -> Iterator[None]:
    """Within this context :func:`checking` is ``on``."""
    global _CHECKING
    previous, _CHECKING = _CHECKING, on
    try:
        yield
    finally:
        _CHECKING = previous


def describe(x: Any) -> str:
    """A short description of what was passed: tensors by shape and dtype, small containers item by item.

    >>> describe((torch.ones(2), 3))
    '(tensor(shape=(2,), dtype=torch.float32), int)'
    """
    if isinstance(x, torch.Tensor):
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, (tuple, list)) and len(x) <= 8:
        inner = ", ".join(describe(v) for v in x)
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    if isinstance(x, dict) and len(x) <= 8:
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def check_function(fn: Any, who: str, signature: str) -> None:
    """A TypeError unless ``fn`` is callable: ``who expects a function <signature>, got ...``."""
    if not callable(fn):
        raise TypeError(f"{who} expects a function {signature}, got {describe(fn)}")


def check_scalar(name: str, x: Any) -> None:
    """A :class:`StepError` unless the ``loss_fn``'s ``name`` output is a 0-d tensor."""
    if not isinstance(x, torch.Tensor):
        raise StepError(f"loss_fn returned a {type(x).__name__} as {name}; it must be a 0-d tensor")
    if x.dim() != 0:
        raise StepError(NOT_A_SCALAR.format(name=name, shape=tuple(x.shape)))


def check_loss(loss: Any, metrics: dict, buffers: dict, new_buffers: Any) -> None:
    """Check what a ``loss_fn`` returned inside the gradient transform: a differentiable scalar, scalar
    metrics, and new buffers with the state's names."""
    check_scalar("loss", loss)
    if not loss.is_floating_point():
        raise StepError(f"loss_fn returned a loss of dtype {loss.dtype}; it must be a floating-point tensor")
    if not loss.requires_grad:
        raise StepError(NOT_DIFFERENTIABLE)
    check_metrics(metrics)
    if not isinstance(new_buffers, dict):
        raise StepError(
            f"loss_fn returned new_buffers as a {type(new_buffers).__name__}; it must be the dict apply returned"
        )
    if set(new_buffers) != set(buffers):
        raise StepError(
            f"loss_fn returned buffers with names {sorted(new_buffers)} but the state has {sorted(buffers)}; "
            "return the new_buffers that apply(...) gave you"
        )


def check_buffers_returned(apply: Any, buffers: dict, new_buffers: Any) -> None:
    """A :class:`StepError` if the forwards wrote buffers (``apply.updated``) that the loss_fn did not return."""
    updated = getattr(apply, "updated", ())
    if new_buffers is not buffers or not updated:
        return
    # A forward writes some of a module's buffers where it can be seen (BatchNorm: num_batches_tracked):
    # name all the buffers of the modules that wrote any.
    owners = sorted({name.rpartition(".")[0] for name in updated})
    names = sorted(name for name in buffers if name.rpartition(".")[0] in owners)
    described = ", ".join(f"{o or '<root>'} ({type(apply.module.get_submodule(o)).__name__})" for o in owners[:3])
    raise StepError(LOST_BUFFERS.format(owners=described, names=names[:9]))


def check_metrics(metrics: Any, scalar: bool = True) -> None:
    """A :class:`StepError` unless ``metrics`` is a dict from names to numbers (0-d tensors if ``scalar``)."""
    if not isinstance(metrics, Mapping):
        raise StepError(f"metrics must be a dict of scalars, got {describe(metrics)}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise StepError(f"metric names must be strings, got {name!r}")
        if scalar and isinstance(value, torch.Tensor) and value.dim() != 0:
            raise StepError(METRIC_NOT_A_SCALAR.format(name=name, shape=tuple(value.shape)))
        if not isinstance(value, (torch.Tensor, int, float)):
            raise StepError(f"metric {name!r} is a {type(value).__name__}; metrics must be 0-d tensors")


def check_train_output(state: Any, out: Any) -> None:
    """Check a train step's ``(new_state, metrics)``: the state's type, structure and leaf shapes kept."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise StepError(f"a train step must return (state, metrics), got {describe(out)}")
    new_state, metrics = out
    if new_state is None:  # the donating form returns only metrics
        return
    if type(new_state) is not type(state):
        raise StepError(f"a train step must return a {type(state).__name__} first, got {describe(new_state)}")
    old_paths, old_leaves, old_spec = tree.flatten_with_path(state)
    _, new_leaves, new_spec = tree.flatten_with_path(new_state)
    if old_spec != new_spec:
        tree.assert_same_structure(state, new_state, names=["the state passed in", "the state returned"])
        raise StepError(STATIC_CHANGED)
    for path, a, b in zip(old_paths, old_leaves, new_leaves):
        if isinstance(a, torch.Tensor) and (
            not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype
        ):
            raise StepError(LEAF_CHANGED.format(path=path, before=describe(a), after=describe(b)))
    check_metrics(metrics, scalar=False)  # (an ensemble step's metrics have one value per member)


def step_failure(kind: str, batch: Any, error: BaseException, when: str = "") -> StepError:
    """The short :class:`StepError` for a step that raised ``error``, pointing at the user's line."""
    return StepError(
        f"{kind} failed on a batch of {describe(batch)}{when}: {type(error).__name__}: {error}{user_frame(error)}\n"
        f"Run make_{kind}(..., compile=False) for the eager traceback."
    )


_TORCH_DIR = os.path.dirname(torch.__file__)
_FTRAIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the ftrain package root
_STDLIB_DIR = os.path.dirname(os.__file__)  # (contextlib, logging: never the line to look at)


def is_user_code(path: str) -> bool:
    """Is the source file ``path`` the user's or a library's they use (not torch's, ftrain's or Python's own)?"""
    if path.startswith((_TORCH_DIR, _FTRAIN_DIR)):
        return False
    return not path.startswith(_STDLIB_DIR) or "site-packages" in path


def user_frame(e: BaseException) -> str:
    """`` (at file:line in fn)`` for the innermost frame of ``e`` that is user code."""
    tb, found = e.__traceback__, None
    while tb is not None:
        if is_user_code(tb.tb_frame.f_code.co_filename):
            found = tb
        tb = tb.tb_next
    if found is None:
        return ""
    code = found.tb_frame.f_code
    return f"\n  at {code.co_filename}:{found.tb_lineno} in {code.co_name}"
