"""Tuning that purity makes easy: a learning-rate sweep and a batch-size finder.

Both call the *pure* train step, so the state you pass in is never changed:
there is nothing to save before and restore after, unlike trainer-based finders.
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from . import optim, tree
from ._batches import check_data, to_device
from ._validate import check_int, check_number

__all__ = ["LRFindResult", "find_batch_size", "lr_find"]


class LRFindResult(NamedTuple):
    """The outcome of :func:`lr_find`.

    Attributes:
        lrs: the learning rate of each step.
        losses: the smoothed (bias-corrected exponential moving average) loss after each step.
        raw_losses: the loss each step returned.
        suggestion: the learning rate where the smoothed loss falls fastest (per unit of log-lr).
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestion: float


def _suggest(lrs: list[float], losses: list[float], skip_start: int, skip_end: int) -> float:
    # The steepest descent of the smoothed loss against log(lr): the usual heuristic (fastai, Lightning).
    lo, hi = skip_start, len(losses) - skip_end
    if hi - lo < 3:
        best = min(range(len(losses)), key=losses.__getitem__)
        return lrs[best] / 10
    logs = [math.log(x) for x in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(lo + 1, hi - 1)]
    i = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[lo + 1 + i]


def lr_find(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, Mapping[str, torch.Tensor]]],
    data: Iterable[Any],
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
) -> LRFindResult:
    """Sweep the learning rate exponentially from ``min_lr`` to ``max_lr``, one step each; suggest one.

    Starting from ``state``, each step trains with the next learning rate and
    records the loss; the sweep stops early once the smoothed loss exceeds
    ``diverge`` times its best (or is not finite). ``state`` itself is never
    modified (the pure step is used), so nothing needs restoring afterwards.

    The learning rate is changed through the optimizer state, so the optimizer
    must be built with :func:`ftrain.optim.inject_hyperparams` and a constant
    ``learning_rate``; the compiled step then never recompiles during the sweep
    (the learning rate is a tensor in the state), and the same step can be
    handed to :func:`ftrain.fit` afterwards.

    Args:
        state: the initial state (left untouched).
        train_step: ``train_step(state, batch) -> (state, metrics)`` with ``"loss"`` in metrics.
        data: batches, re-iterated as needed.
        min_lr: the first learning rate.
        max_lr: the last learning rate.
        num_steps: the number of learning rates tried.
        beta: the smoothing of the loss curve (exponential moving average).
        diverge: stop when the smoothed loss exceeds ``diverge * best``.

    Returns:
        An :class:`LRFindResult` with the curve and ``suggestion``.

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> from ftrain import optim
        >>> _ = torch.manual_seed(0)
        >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
        >>> state = ftrain.TrainState.create(nn.Linear(4, 1), tx)
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     x, y = batch
        ...     return ((apply(params, buffers, x)[0] - y) ** 2).mean()
        >>> step = ftrain.make_train_step(loss_fn, compile=False)
        >>> x = torch.randn(64, 4); data = [(x, x.sum(1, keepdim=True))]
        >>> result = ftrain.lr_find(state, step, data, min_lr=1e-4, max_lr=10.0, num_steps=30)
        >>> 1e-4 <= result.suggestion <= 10.0, int(state.step)
        (True, 0)
    """
    if not callable(train_step):
        raise TypeError(f"lr_find: train_step must be callable, got {type(train_step).__name__}")
    check_data(data, "lr_find: data")
    check_number(min_lr, "min_lr", who="lr_find", low=0, open_low=True)
    check_number(max_lr, "max_lr", who="lr_find", low=min_lr, open_low=True)
    check_int(num_steps, "num_steps", who="lr_find", low=2)
    check_number(beta, "beta", who="lr_find", low=0, high=1, open_high=True)
    if "learning_rate" not in optim.get_hyperparams(state.opt_state):
        raise ValueError(
            "lr_find: the optimizer state has no injected learning_rate, so the sweep cannot set it without "
            "recompiling; build the optimizer as optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, ...)"
        )
    device = tree.device_of(state, default=None)
    ratio = (max_lr / min_lr) ** (1 / (num_steps - 1))
    lrs, losses, raw = [], [], []
    avg, best = 0.0, math.inf
    batches = _cycle(data)
    current = state
    for i in range(num_steps):
        lr = min_lr * ratio**i
        current = current.replace(opt_state=optim.set_hyperparams(current.opt_state, learning_rate=lr))
        current, metrics = train_step(current, to_device(next(batches), device))
        if i == 0:
            used = float(optim.get_hyperparams(current.opt_state)["learning_rate"])
            if not math.isclose(used, lr, rel_tol=1e-3):
                raise ValueError(
                    f"lr_find: the step used learning_rate={used:g}, not the {lr:g} that was set; the learning rate "
                    "is a schedule, which overrides it each step. Use a constant learning_rate for the sweep"
                )
        if "loss" not in metrics:
            raise KeyError(f"lr_find: the train step's metrics have no 'loss'; they have {sorted(metrics)}")
        loss = float(metrics["loss"])  # a host sync per step: the sweep decides when to stop
        raw.append(loss)
        lrs.append(lr)
        avg = beta * avg + (1 - beta) * loss
        smoothed = avg / (1 - beta ** (i + 1))
        losses.append(smoothed)
        if not math.isfinite(smoothed) or smoothed > diverge * best:
            break
        best = min(best, smoothed)
    finite = [j for j, v in enumerate(losses) if math.isfinite(v)]
    lrs_f, losses_f = [lrs[j] for j in finite], [losses[j] for j in finite]
    if not lrs_f:
        raise ValueError(f"lr_find: the loss was not finite even at min_lr={min_lr:g}; lower min_lr")
    suggestion = _suggest(lrs_f, losses_f, skip_start=min(10, len(lrs_f) // 10), skip_end=min(5, len(lrs_f) // 20))
    return LRFindResult(lrs, losses, raw, suggestion)


def _cycle(data: Iterable[Any]):
    for n in itertools.count():
        got = False
        for batch in data:
            got = True
            yield batch
        if not got:
            raise ValueError(
                "lr_find: the data produced no batches" + (" on a second pass (an exhausted iterator?)" if n else "")
            )


def _is_oom(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def find_batch_size(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, Mapping[str, torch.Tensor]]],
    make_batch: Callable[[int], Any],
    *,
    start: int = 1,
    max_size: int = 65536,
    steps: int = 2,
    refine: bool = True,
) -> int:
    """The largest batch size (up to ``max_size``) whose train step runs without running out of memory.

    Doubles the batch size from ``start`` until a step raises an out-of-memory
    error (or ``max_size`` is reached), then, with ``refine``, bisects between the
    last size that fit and the first that did not. Each trial runs ``steps`` pure
    steps from ``state`` (left untouched). With a compiled step, each new batch
    size may compile once (torch.compile marks the batch dimension dynamic from
    the second size on); leave some headroom for memory fragmentation.

    Args:
        state: the state to train (not modified).
        train_step: the train step.
        make_batch: ``make_batch(batch_size) -> batch``.
        start: the first size tried; it must fit.
        max_size: the largest size tried.
        steps: steps per trial (the second step sees the steady-state memory).
        refine: bisect between the last fitting power of two and the first failing one.

    Example:
        >>> def step(state, batch):
        ...     if batch > 48:
        ...         raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        ...     return state, {}
        >>> from types import SimpleNamespace
        >>> find_batch_size(SimpleNamespace(step=torch.tensor(0)), step, lambda n: n)
        48
    """
    if not callable(make_batch):
        raise TypeError(f"find_batch_size: make_batch must be callable (batch_size -> batch), got {make_batch!r}")
    for name, value in (("start", start), ("max_size", max_size), ("steps", steps)):
        check_int(value, name, who="find_batch_size")
    if start > max_size:
        raise ValueError(f"find_batch_size: start={start} is above max_size={max_size}")

    def fits(size: int) -> bool:
        try:
            s = state
            for _ in range(steps):
                s, _metrics = train_step(s, make_batch(size))
            return True
        except Exception as e:
            if not _is_oom(e):
                raise
        # Out of memory: drop what the failed attempt still references (the traceback holds
        # its frames) before the next, smaller try.
        s = _metrics = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return False

    if not fits(start):
        raise RuntimeError(f"find_batch_size: even batch_size={start} runs out of memory")
    good, bad = start, None
    while good < max_size:
        size = min(good * 2, max_size)
        if fits(size):
            good = size
        else:
            bad = size
            break
    if refine and bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    return good
