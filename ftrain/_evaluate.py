"""Evaluation and prediction over a dataset: :func:`evaluate`, :func:`predict`.

They sit below both the loop and the actions: ``fit`` evaluates through
:class:`ftrain.actions.Evaluate`, and you call them directly after training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import tree
from ._batches import add_note, batch_size, check_data, to_device
from .mesh import Mesh
from .metrics import Accumulator

__all__ = ["evaluate", "predict"]

LAST_ACROSS_RANKS = (
    "evaluate: metric {name!r} uses the 'last' reduction, which has no meaning over several ranks' slices; "
    "use 'mean', 'sum', 'max' or 'min' under a mesh"
)


def evaluate(
    state: Any,
    eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]],
    data: Iterable[Any],
    *,
    reductions: Mapping[str, str] | None = None,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Run ``eval_step`` over every batch of ``data``; return the metrics as floats.

    Metrics are averaged over batches weighted by batch size (so a smaller last
    batch counts exactly), on the device, with one host sync at the end.

    Under a mesh, each rank evaluates its own ``data``: a disjoint slice of the set, such as
    ``ftrain.data.Loader(dataset, batch_size, drop_last=False, **mesh.loader_kwargs())``, which
    splits every batch over the ranks without padding any item in twice. The sums and weights are
    all-reduced once at the end, so every rank returns what one process evaluating the whole set
    returns (up to float rounding). A rank's empty share of a small last batch is skipped.

    Args:
        state: the state to evaluate.
        eval_step: ``eval_step(state, batch) -> metrics`` (a dict of 0-d tensors).
        data: an iterable of batches (moved to the state's device).
        reductions: per-metric reductions other than the weighted mean, e.g.
            ``{"n": "sum"}`` (see :class:`ftrain.metrics.Accumulator`).
        mesh: the :class:`ftrain.Mesh` whose ranks share the evaluation (call it on every rank);
            default: the eval step's ``mesh`` (``ftrain.make_eval_step(..., mesh=mesh)``).

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
    mesh = mesh if mesh is not None else getattr(eval_step, "mesh", None)
    shared = mesh is not None and mesh.is_distributed
    device = tree.device_of(state, default=None)
    acc = Accumulator(reductions)
    weights: dict[str, float] = {}  # each metric's total weight here (for a mean over the ranks)
    for i, batch in enumerate(data):
        weight = batch_size(batch)
        if shared and weight == 0:
            continue  # this rank's share of a last batch smaller than the mesh
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
        acc.update(metrics, weight=weight)
        for name in metrics:
            weights[name] = weights.get(name, 0.0) + weight
    result = _over_ranks(mesh, acc, weights) if shared else acc.compute()
    if not result:
        raise ValueError(f"evaluate: the data produced no batches ({type(data).__name__})")
    return result


def _over_ranks(mesh: Mesh, acc: Accumulator, weights: Mapping[str, float]) -> dict[str, float]:
    """The metrics over every rank's slice, from each rank's reductions of its own (a few collectives)."""
    local = acc.compute()  # this rank's one host sync
    everyone: list[Any] = [None] * mesh.size
    torch.distributed.all_gather_object(everyone, sorted(local))  # a rank may lack a metric, or every batch
    names = sorted(set().union(*everyone))
    by: dict[str, list[str]] = {kind: [] for kind in ("mean", "sum", "max", "min", "last")}
    for name in names:
        by[acc.reductions.get(name, acc.default)].append(name)
    if by["last"]:
        raise ValueError(LAST_ACROSS_RANKS.format(name=by["last"][0]))
    op = torch.distributed.ReduceOp
    # A mean over the ranks is the sum of their weighted sums over the sum of their weights.
    means, n = by["mean"], len(by["mean"])
    summed = _all_reduce(
        mesh,
        [local.get(m, 0.0) * weights.get(m, 0.0) for m in means]
        + [weights.get(m, 0.0) for m in means]
        + [local.get(m, 0.0) for m in by["sum"]],
        op.SUM,
    )
    out = {m: total / weight for m, total, weight in zip(means, summed[:n], summed[n : 2 * n])}
    out.update(zip(by["sum"], summed[2 * n :]))
    out.update(zip(by["max"], _all_reduce(mesh, [local.get(m, -math.inf) for m in by["max"]], op.MAX)))
    out.update(zip(by["min"], _all_reduce(mesh, [local.get(m, math.inf) for m in by["min"]], op.MIN)))
    return {name: out[name] for name in names}


def _all_reduce(mesh: Mesh, values: list[float], op: Any) -> list[float]:
    if not values:
        return []
    reduced = torch.tensor(values, dtype=torch.float64, device=mesh.device)
    torch.distributed.all_reduce(reduced, op=op)
    return reduced.cpu().tolist()


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
