"""What an update reports on the way: the learning rate it used and the gradient norm it clipped by.

A train step wants these as metrics, but they are made deep inside a chain's closures and the
optimizer state does not keep them (a constant learning rate is not state; the clipping norm is
gone once the update returns). So a block :func:`report` s them to the innermost
:func:`record` call around the update. Both are plain Python, run while ``torch.compile``
traces the step: the reported tensors become outputs of the same graph (no host sync), and
outside a :func:`record` a report does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import tree
from ..tree import PyTree

_RECORDS: list[dict[str, Any]] = []
_INPUTS = "<inputs>"  # the tree record() was told holds the raw gradients


def record(fn: Callable[..., Any], *args: Any, gradients: PyTree = None, **kwargs: Any) -> tuple[Any, dict]:
    """``(fn(*args, **kwargs), reported)``: the result and the tensors the update reported meanwhile.

    ``reported`` maps a name (``"lr"``, ``"lr/<group>"`` under :func:`partition`, ``"grad_norm"``)
    to a 0-d tensor. Pass the gradients the update starts from as ``gradients``: a
    :func:`clip_by_global_norm` that sees exactly them reports its norm as ``"grad_norm"`` (one
    further down a chain sees other numbers, and stays quiet).

    Example:
        >>> import torch
        >>> from ftrain import optim
        >>> tx = optim.chain(optim.clip_by_global_norm(10.0), optim.sgd(0.1))
        >>> grads = {"w": torch.tensor([3.0, 4.0])}
        >>> (updates, _), reported = record(tx.update, grads, tx.init(grads), gradients=grads)
        >>> {k: round(float(v), 4) for k, v in reported.items()}
        {'grad_norm': 5.0, 'lr': 0.1}
    """
    reported: dict[str, Any] = {_INPUTS: gradients}  # (flattened only if a clip asks: report_gradient_norm)
    _RECORDS.append(reported)
    try:
        out = fn(*args, **kwargs)
    finally:
        _RECORDS.pop()
    del reported[_INPUTS]
    return out, reported


def report(name: str, value: torch.Tensor) -> None:
    """Hand ``value`` to the innermost :func:`record` as ``name`` (the first report of a name wins)."""
    if _RECORDS:
        _RECORDS[-1].setdefault(name, value.detach().to(torch.float32))


def report_gradient_norm(updates: PyTree, norm: torch.Tensor) -> None:
    """Report ``norm`` as ``"grad_norm"`` if ``updates`` are the raw gradients :func:`record` was given."""
    if not _RECORDS:
        return
    raw = _RECORDS[-1][_INPUTS]
    if raw is None:
        return
    raw, leaves = tree.leaves(raw), tree.leaves(updates)
    if len(raw) == len(leaves) and all(a is b for a, b in zip(raw, leaves)):
        report("grad_norm", norm)


def report_learning_rate(learning_rate: Any, like: PyTree) -> None:
    """Report a learning rate (a float or a 0-d tensor) as ``"lr"``, on the device of ``like``."""
    if not _RECORDS:
        return
    device = like.device if isinstance(like, torch.Tensor) else tree.device_of(like)
    if isinstance(learning_rate, torch.Tensor):
        report("lr", learning_rate.to(dtype=torch.float32, device=device))
    else:
        _RECORDS[-1].setdefault("lr", constant(float(learning_rate), device))


_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def constant(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d float32 tensor on ``device``: in eager code, the same tensor every call.

    A constant learning rate is reported every step; building its tensor anew each time is a
    few microseconds of an eager step. The cached tensor is handed out only while nothing has
    written into it (its version counter is still 0: an in-place op on a reported metric makes
    the next call build a fresh one), so every call's tensor holds ``value``. Traced, under a
    ``torch.func`` transform or a dispatch mode it is built each call (a factory in the graph,
    not a tensor constant, which make_fx and export cannot lift), and so it is under
    ``torch.inference_mode`` (whose tensors keep no version counter).

    Example:
        >>> a, b = constant(0.375, torch.device("cpu")), constant(0.375, torch.device("cpu"))
        >>> a is b, a
        (True, tensor(0.3750))
        >>> _ = a.add_(1.0)  # (someone wrote into a reported metric)
        >>> constant(0.375, torch.device("cpu"))
        tensor(0.3750)
    """
    if not tree.host_readable() or torch.is_inference_mode_enabled():
        return torch.full((), value, dtype=torch.float32, device=device)
    key = (value.hex(), device)  # (by its bits: 0.0 and -0.0 are equal keys otherwise)
    cached = _CONSTANTS.get(key)
    if cached is None or cached._version:
        if len(_CONSTANTS) >= 64:  # (bounded: a learning rate set anew by hand each step)
            _CONSTANTS.clear()
        cached = _CONSTANTS[key] = torch.full((), value, dtype=torch.float32, device=device)
    return cached


def report_group(label: str, reported: dict) -> None:
    """Pass a group's reports up, ``"lr"`` as ``"lr/<label>"`` (one learning rate per group)."""
    for name, value in reported.items():
        report(f"{name}/{label}", value)
