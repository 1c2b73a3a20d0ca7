"""Batch plumbing shared by the loop, evaluation and tuning: check the data, move a batch, size it.

The device a state lives on is :func:`ftrain.tree.device_of`; these helpers take it as given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import tree

__all__ = ["add_note", "batch_size", "check_data", "length", "to_device"]

NOT_BATCHES = (
    "{what} must be an iterable of batches (a DataLoader, ftrain.data.Loader, a list of batches, a generator), "
    "got {kind}; wrap tensors in a DataLoader(TensorDataset(x, y), batch_size=...)"
)


def check_data(data: Any, what: str) -> None:
    """Refuse what is not an iterable of batches (a tensor, a string, a dict), naming ``what`` in the TypeError.

    >>> check_data([1, 2], "fit: data")
    >>> check_data(torch.zeros(3), "fit: data")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: fit: data must be an iterable of batches (...), got Tensor; wrap tensors in a ...
    """
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(NOT_BATCHES.format(what=what, kind=type(data).__name__))


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensor leaves on ``device`` (those already there are left as they are).

    A copy to a GPU does not wait: from pinned host memory (``ftrain.data.Loader(pin_memory=True)``)
    it runs while the GPU still computes the previous step. A copy to the CPU waits until it has
    landed, since the host reads it next.

    >>> to_device({"x": torch.ones(2), "n": 3}, torch.device("cpu"))
    {'x': tensor([1., 1.]), 'n': 3}
    """
    # (A non-blocking copy from a GPU would hand the host memory the GPU may not have written yet.)
    non_blocking = device.type != "cpu"
    return tree.map(
        lambda x: x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) and x.device != device else x,
        batch,
    )


def batch_size(batch: Any) -> int:
    """The leading dim of the first tensor leaf with one (1 when there is none): a batch's weight in a mean.

    >>> batch_size((torch.zeros(5, 2), torch.zeros(5)))
    5
    """
    for x in tree.leaves(batch):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.shape[0]
    return 1


def length(data: Any) -> int | None:
    """``len(data)``, or None for data without a length (a generator, an iterable dataset).

    >>> length([1, 2, 3]), length(iter([1, 2, 3]))
    (3, None)
    """
    try:
        return len(data)
    except TypeError:
        return None


def add_note(error: BaseException, message: str) -> None:
    """Add where in the loop ``error`` happened, keeping its type (callers may catch it); a no-op before 3.11."""
    if hasattr(error, "add_note"):
        error.add_note(message)
