"""Evaluation and prediction over a dataset: :func:`evaluate`, :func:`predict`.

They sit below both the loop and the actions: ``fit`` evaluates through
:class:`ftrain.actions.Evaluate`, and you call them directly after training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import tree
from ._batches import add_note, batch_size, check_data, to_device
from .metrics import Accumulator

__all__ = ["evaluate", "predict"]


def evaluate(
    state: Any,
    eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]],
    data: Iterable[Any],
    *,
    reductions: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Run ``eval_step`` over every batch of ``data``; return the metrics as floats.

    Metrics are averaged over batches weighted by batch size (so a smaller last
    batch counts exactly), on the device, with one host sync at the end.

    Args:
        state: the state to evaluate.
        eval_step: ``eval_step(state, batch) -> metrics`` (a dict of 0-d tensors).
        data: an iterable of batches (moved to the state's device).
        reductions: per-metric reductions other than the weighted mean, e.g.
            ``{"n": "sum"}`` (see :class:`ftrain.metrics.Accumulator`).

    Returns:
        ``{name: value}`` as Python floats.

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> def eval_step(state, batch):
        ...     return {"mean_x": batch.mean()}
        >>> ftrain.evaluate(state, eval_step, [torch.ones(3, 2), torch.zeros(1, 2)])
        {'mean_x': 0.75}
    """
    if not callable(eval_step):
        raise TypeError(f"evaluate: eval_step must be callable, got {type(eval_step).__name__}")
    check_data(data, "evaluate: data")
    device = tree.device_of(state, default=None)
    acc = Accumulator(reductions)
    for i, batch in enumerate(data):
        batch = to_device(batch, device)
        try:
            metrics = eval_step(state, batch)
        except Exception as e:
            add_note(e, f"ftrain.evaluate: eval_step raised on batch {i}")
            raise
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"evaluate: eval_step must return a dict of 0-d tensors, got {type(metrics).__name__}; "
                "for outputs use ftrain.predict"
            )
        acc.update(metrics, weight=batch_size(batch))
    if not acc.count:
        raise ValueError(f"evaluate: the data produced no batches ({type(data).__name__})")
    return acc.compute()


def predict(state: Any, predict_step: Callable[[Any, Any], Any], data: Iterable[Any], *, concat: bool = True) -> Any:
    """Run ``predict_step`` over ``data``; return the outputs concatenated along dim 0.

    Outputs stay on the device. The outputs may be a tensor or any pytree of
    tensors (a dict of logits and embeddings); with ``concat=False`` the list of
    per-batch outputs is returned instead.

    Args:
        state: the state to predict with.
        predict_step: ``predict_step(state, batch) -> outputs``.
        data: an iterable of batches (moved to the state's device).
        concat: concatenate per-batch outputs leaf by leaf.

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> step = lambda state, x: state.apply_fn(state.params, state.buffers, x)[0]
        >>> ftrain.predict(state, step, [torch.ones(3, 2), torch.ones(2, 2)]).shape
        torch.Size([5, 1])
    """
    if not callable(predict_step):
        raise TypeError(f"predict: predict_step must be callable, got {type(predict_step).__name__}")
    check_data(data, "predict: data")
    device = tree.device_of(state, default=None)
    outputs = []
    for i, batch in enumerate(data):
        try:
            outputs.append(predict_step(state, to_device(batch, device)))
        except Exception as e:
            add_note(e, f"ftrain.predict: predict_step raised on batch {i}")
            raise
    if not outputs:
        raise ValueError(f"predict: the data produced no batches ({type(data).__name__})")
    if not concat:
        return outputs
    return tree.map(lambda *xs: torch.cat(xs), *outputs)
