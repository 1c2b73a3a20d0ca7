"""The thin loop: :func:`fit`, :func:`evaluate`, :func:`predict`, and a few debugging helpers.

``fit`` iterates the data, calls the (compiled, pure) train step and then the
periodic actions (:mod:`ftrain.actions`). That is all: evaluation, logging,
checkpointing, early stopping and the progress bar are actions, each deciding
from the step number whether it is its turn. Nothing reads a value back from
the device per step; the train metrics are accumulated on the device and synced
once per log interval.

Debugging conveniences are data wrappers and a small function rather than
flags on ``fit``: :func:`limit_batches` (limit train/eval batches),
:func:`overfit_batches` (train on the same few batches), :func:`fast_dev_run`
(a few steps of train and eval, nothing written). The eval interval is
``fit``'s ``eval_every``.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from . import tree
from .actions import Checkpoint, Evaluate, Every, LogMetrics, ProgressBar, Run, _trigger
from .metrics import Accumulator
from .writers import Writer, to_writer

__all__ = ["evaluate", "fast_dev_run", "fit", "limit_batches", "overfit_batches", "predict"]


def _note(error: BaseException, message: str) -> None:
    # Keep the exception's type (callers may catch it) and add where in the loop it happened.
    if hasattr(error, "add_note"):
        error.add_note(message)


def _device_of(state: Any) -> torch.device:
    params = getattr(state, "params", None)
    leaves = tree.leaves(params) if params is not None else []
    leaves = [x for x in leaves or tree.leaves(state) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise TypeError(f"expected a TrainState (a pytree of tensors), got {type(state).__name__} with no tensors")
    return leaves[0].device


def _to_device(batch: Any, device: torch.device) -> Any:
    # non_blocking: a pinned host batch is copied while the device still runs the previous step.
    return tree.map(
        lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) and x.device != device else x,
        batch,
    )


def _batch_size(batch: Any) -> int:
    for x in tree.leaves(batch):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.shape[0]
    return 1


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _check_data(data: Any, what: str) -> None:
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{what} must be an iterable of batches (a DataLoader, ftrain.data.Loader, a list of batches, "
            f"a generator), got {type(data).__name__}; wrap tensors in a DataLoader(TensorDataset(x, y), batch_size=...)"
        )


def _positive_int(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"fit: {name} must be a positive int, got {value!r}")


def _passes(data: Any, run: Run, passes: int | None, resumed: bool) -> Iterator[Any]:
    """The batches of up to ``passes`` passes over ``data`` (forever if None); counts epochs on ``run``."""
    seen_any = False
    empty_before = not resumed  # a resumed loader may sit at the end of an epoch: one empty pass is fine then
    done = 0
    while passes is None or done < passes:
        n = 0
        for batch in data:
            n += 1
            yield batch
        done += 1
        if n:
            run.epoch += 1
            seen_any, empty_before = True, False
            continue
        if not empty_before:
            empty_before = True
            continue
        if not seen_any:
            raise ValueError(
                f"fit: the training data produced no batches ({type(data).__name__}); check the dataset is not "
                "empty and that batch_size <= len(dataset) when drop_last=True"
            )
        warnings.warn(
            f"fit: the training data ran out after {run.step} steps, before num_steps={run.num_steps}; an iterator "
            "or generator can be consumed only once: pass a re-iterable (a list, a DataLoader) to train longer",
            RuntimeWarning,
            stacklevel=3,
        )
        return


def fit(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, Mapping[str, torch.Tensor]]],
    data: Iterable[Any],
    *,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]] | None = None,
    eval_data: Iterable[Any] | None = None,
    eval_every: int | float | Every | None = None,
    checkpoint: Any = None,
    resume: bool = True,
    log: Writer | Iterable[Writer] | None = None,
    log_every: int | Every = 50,
    hparams: Mapping[str, Any] | None = None,
    progress: bool = True,
    actions: Iterable[Callable[[Run], Any]] = (),
) -> Any:
    """Train ``state`` with ``train_step`` over ``data``; return the final state.

    Each step: fetch a batch, move it to the state's device, call the step,
    fold its metrics into on-device accumulators, run the actions. Actions
    (built from the arguments below plus ``actions``) run sorted by their
    ``order``: stop-on-non-finite, evaluate, log, progress bar, yours,
    checkpoint.

    **Donation.** When ``train_step`` has a ``.donate`` variant (as the steps of
    :func:`ftrain.make_train_step` do), ``fit`` uses it: each step writes its
    result into the previous state's storage, which saves a state's worth of
    memory. The ``state`` you pass in is consumed: use the returned state, and
    pass ``ftrain.tree.map(torch.clone, state)`` if you need the original too.
    An action that keeps earlier states (:class:`~ftrain.actions.StopOnNonFinite`)
    switches ``fit`` to the pure step.

    **Resume.** With ``checkpoint=manager`` and ``resume=True``, ``fit`` first
    restores the latest checkpoint in the manager's directory (and the data
    position, when ``data`` has ``load_state_dict``), so running the same
    command again continues where it stopped. It saves when
    ``manager.should_save(step)``, once more at the end, and waits for async
    saves before returning. If the loop raises (e.g. the data fails), saves
    already under way are completed and nothing new is written.

    Args:
        state: the :class:`ftrain.TrainState` to start from.
        train_step: ``train_step(state, batch) -> (state, metrics)``; metrics is a
            dict of 0-d tensors (it should include ``"loss"``).
        data: any iterable of batches: a ``DataLoader``, :class:`ftrain.data.Loader`,
            a list, a generator. It is iterated again for each epoch.
        num_steps: train until the state's step reaches this (an absolute count, so a
            resumed run ends at the same step).
        num_epochs: or this many passes over ``data`` (with ``len(data)``: until step
            ``num_epochs * len(data)``). Default: one pass, if neither is given.
        eval_step: ``eval_step(state, batch) -> metrics``, run over ``eval_data``;
            results are published as ``val/<name>``.
        eval_data: the evaluation batches.
        eval_every: an int (steps), a float (epochs, e.g. ``0.5``) or
            ``ftrain.actions.every(...)``. Default: once per epoch when ``len(data)``
            exists. The final state is always evaluated.
        checkpoint: a checkpoint manager (:class:`ftrain.CheckpointManager`).
        resume: restore the manager's latest checkpoint first (``False``: start from ``state``).
        log: a writer or a list of writers (:mod:`ftrain.writers`); flushed, not closed, at the end.
        log_every: how often (steps) the train metrics are synced, published as
            ``train/<name>`` and written.
        hparams: the run's hyperparameters / config, written once at the start.
        progress: show a tqdm progress bar (refreshed every ``log_every`` steps; on
            rank 0 only; skipped if tqdm is not installed).
        actions: more actions (see :mod:`ftrain.actions`): early stopping, profiling, your own.

    Returns:
        The final state (the rolled-back one if an action rolled back).

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     x, y = batch
        ...     out, _ = apply(params, buffers, x)
        ...     return ((out - y) ** 2).mean()
        >>> train_step = ftrain.make_train_step(loss_fn, compile=False)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))] * 4
        >>> state = ftrain.fit(state, train_step, data, num_epochs=2, progress=False)
        >>> int(state.step)
        8
    """
    # ---- validate everything before the first (possibly slow, compiling) step ----
    if not isinstance(getattr(state, "step", None), torch.Tensor):
        raise TypeError(f"fit: state must be an ftrain.TrainState (with a step tensor), got {type(state).__name__}")
    if not callable(train_step):
        raise TypeError(f"fit: train_step must be callable, got {type(train_step).__name__}")
    _check_data(data, "fit: data")
    _positive_int(num_steps, "num_steps")
    _positive_int(num_epochs, "num_epochs")
    if num_steps is not None and num_epochs is not None:
        raise ValueError(f"fit: pass num_steps or num_epochs, not both (got {num_steps} and {num_epochs})")
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: eval_step and eval_data go together; pass both or neither")
    if eval_every is not None and eval_step is None:
        raise ValueError("fit: eval_every needs eval_step= and eval_data=")
    if eval_data is not None:
        _check_data(eval_data, "fit: eval_data")
    actions = list(actions)
    for i, a in enumerate(actions):
        if not callable(a):
            raise TypeError(
                f"fit: actions[{i}] is a {type(a).__name__}, not callable; an action is a callable action(run), "
                "e.g. ftrain.actions.EarlyStopping('val/loss') or @ftrain.actions.every(100) on a function"
            )
    log_trigger = _trigger(log_every, "fit: log_every")
    writer = to_writer(log)
    manager = Checkpoint(checkpoint) if checkpoint is not None else None
    if manager is not None and resume and not callable(getattr(checkpoint, "restore_latest", None)):
        raise TypeError(
            f"fit: resume=True needs checkpoint.restore_latest(template); a {type(checkpoint).__name__} has none "
            "(pass resume=False to only save)"
        )
    steps_per_epoch = _length(data)
    if steps_per_epoch == 0:
        raise ValueError(f"fit: the training data is empty (len(data) == 0, a {type(data).__name__})")
    if num_steps is None and num_epochs is None:
        num_epochs = 1

    # ---- resume ----
    resumed = False
    if manager is not None and resume:
        restored = manager.manager.restore_latest(state)
        if restored is not None:
            state, extras = restored
            position = (extras or {}).get("data")
            if position is not None:
                if callable(getattr(data, "load_state_dict", None)):
                    data.load_state_dict(position)
                    resumed = True
                else:
                    warnings.warn(
                        f"fit: the checkpoint holds a data position but the data ({type(data).__name__}) has no "
                        "load_state_dict; it restarts from its beginning (use ftrain.data.Loader for exact resume)",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    start = int(state.step)  # the one host sync before the loop; from here the loop counts steps itself
    if num_steps is not None:
        total, passes = num_steps, None
    elif steps_per_epoch is not None:
        total, passes = num_epochs * steps_per_epoch, None
    else:
        total, passes = None, num_epochs
    if total is not None and start >= total:
        return state

    # ---- actions, in order ----
    built: list[Any] = [LogMetrics(log_trigger)]
    if eval_step is not None:
        if eval_every is None and steps_per_epoch is not None:
            eval_every = Every(epochs=1)
        built.append(Evaluate(eval_step, eval_data, every=eval_every))
    if progress and importlib.util.find_spec("tqdm") is not None:
        built.append(ProgressBar(log_trigger))
    if manager is not None:
        built.append(manager)
    for a in built:
        trigger = getattr(a, "every", None)
        if isinstance(trigger, Every) and trigger.epochs is not None and steps_per_epoch is None:
            raise ValueError(
                f"fit: an interval in epochs ({trigger}) needs data with a len(), but {type(data).__name__} has "
                "none; give eval_every/log_every in steps (an int) instead"
            )
    acts = sorted([*built, *actions], key=lambda a: getattr(a, "order", 0))
    keeps_states = any(getattr(a, "keeps_old_states", False) for a in acts)
    donate = getattr(train_step, "donate", None)
    step_fn = donate if callable(donate) and not keeps_states else train_step

    run = Run(
        state,
        step=start,
        num_steps=total,
        steps_per_epoch=steps_per_epoch,
        writer=writer,
        data=data,
        donating=step_fn is not train_step,
        actions=acts,
    )
    device = _device_of(state)
    batches = _passes(data, run, passes, resumed)
    try:
        if hparams:
            writer.write_hparams(hparams)
        for a in acts:
            if callable(getattr(a, "start", None)):
                a.start(run)
        _loop(run, step_fn, batches, device, acts, total)
        for a in acts:
            if callable(getattr(a, "end", None)):
                a.end(run)
    except BaseException:
        for a in acts:
            if callable(getattr(a, "abort", None)):
                try:
                    a.abort(run)
                except Exception as e:  # the original error matters more; keep it
                    warnings.warn(f"fit: {type(a).__name__}.abort failed while unwinding: {e!r}", stacklevel=2)
        raise
    finally:
        batches.close()  # release DataLoader workers
        writer.flush()
    return run.state


def _loop(run: Run, step_fn: Callable, batches: Iterator[Any], device: torch.device, acts: list, total: int | None):
    """The hot loop: no host sync here; actions decide when to look at values."""
    monotonic = time.monotonic
    metrics_update = run.train_metrics.update
    # Batches come from host memory; on a CPU state there is nothing to move (and mapping over
    # the batch would cost more than a small step's compiled call).
    move = device.type != "cpu"
    first = True
    while total is None or run.step < total:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as e:
            _note(
                e,
                f"ftrain.fit: the data raised while producing the batch for step {run.step + 1} (epoch {run.epoch}); "
                "checkpoints already written are intact",
            )
            raise
        if move:
            batch = _to_device(batch, device)
        try:
            state, metrics = step_fn(run.state, batch)
        except Exception as e:
            _note(e, f"ftrain.fit: train_step raised at step {run.step + 1} (epoch {run.epoch})")
            raise
        if first:
            first = False
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"fit: train_step must return (state, metrics) with metrics a dict of 0-d tensors, "
                    f"got metrics of type {type(metrics).__name__}"
                )
        run.step += 1
        run.state = state
        run.step_metrics = metrics
        run.time = monotonic()
        metrics_update(metrics)
        if run.new:
            run.new = {}
        for a in acts:
            a(run)
            if run.rolled_back:
                break
        if run.stop_reason is not None:
            break


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
    _check_data(data, "evaluate: data")
    device = _device_of(state)
    acc = Accumulator(reductions)
    for i, batch in enumerate(data):
        batch = _to_device(batch, device)
        try:
            metrics = eval_step(state, batch)
        except Exception as e:
            _note(e, f"ftrain.evaluate: eval_step raised on batch {i}")
            raise
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"evaluate: eval_step must return a dict of 0-d tensors, got {type(metrics).__name__}; "
                "for outputs use ftrain.predict"
            )
        acc.update(metrics, weight=_batch_size(batch))
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
    _check_data(data, "predict: data")
    device = _device_of(state)
    outputs = []
    for i, batch in enumerate(data):
        try:
            outputs.append(predict_step(state, _to_device(batch, device)))
        except Exception as e:
            _note(e, f"ftrain.predict: predict_step raised on batch {i}")
            raise
    if not outputs:
        raise ValueError(f"predict: the data produced no batches ({type(data).__name__})")
    if not concat:
        return outputs
    return tree.map(lambda *xs: torch.cat(xs), *outputs)


class _Limited:
    def __init__(self, data: Iterable[Any], n: int):
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)

    def __len__(self) -> int:
        length = _length(self.data)
        return self.n if length is None else min(self.n, length)


def limit_batches(data: Iterable[Any], n: int) -> Iterable[Any]:
    """At most the first ``n`` batches of each pass over ``data`` (limit train or eval batches).

    Each pass starts a fresh iteration of ``data``; ``len()`` is ``min(n, len(data))``.

    Args:
        data: a re-iterable of batches.
        n: how many batches per pass.

    Example:
        >>> list(limit_batches(range(10), 3)), len(limit_batches(range(10), 3))
        ([0, 1, 2], 3)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"limit_batches: n must be a positive int, got {n!r}")
    _check_data(data, "limit_batches: data")
    return _Limited(data, n)


def overfit_batches(data: Iterable[Any], n: int = 1) -> list[Any]:
    """The first ``n`` batches of ``data``, as a list: every epoch then trains on the same batches.

    A model that cannot drive the loss on a few batches towards zero has a bug;
    this is the quickest check. Use it for ``eval_data`` too.

    Args:
        data: an iterable of batches.
        n: how many batches to keep.

    Example:
        >>> overfit_batches(iter([10, 20, 30]), 2)
        [10, 20]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"overfit_batches: n must be a positive int, got {n!r}")
    _check_data(data, "overfit_batches: data")
    batches = list(itertools.islice(iter(data), n))
    if len(batches) < n:
        raise ValueError(f"overfit_batches: asked for {n} batches, but the data has only {len(batches)}")
    return batches


def fast_dev_run(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, Mapping[str, torch.Tensor]]],
    data: Iterable[Any],
    *,
    eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]] | None = None,
    eval_data: Iterable[Any] | None = None,
    steps: int = 2,
) -> dict[str, float]:
    """Smoke-test a setup: ``steps`` train steps and ``steps`` eval batches, nothing written.

    The whole path (data, step, metrics, evaluation) runs once, without a
    checkpoint, writers or progress bar; the step is called without donation,
    so ``state`` is left intact for the real run. Returns the train metrics
    (``train/*``) and, with an eval step, the eval metrics (``val/*``).

    Args:
        state: the initial state (not consumed).
        train_step: the train step.
        data: the training batches (only the first ``steps`` are used).
        eval_step: an eval step, with ``eval_data``.
        eval_data: the eval batches (only the first ``steps`` are used).
        steps: the number of train steps and eval batches.

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     out, _ = apply(params, buffers, batch)
        ...     return out.pow(2).mean()
        >>> step = ftrain.make_train_step(loss_fn, compile=False)
        >>> sorted(fast_dev_run(state, step, [torch.ones(4, 2)] * 10))
        ['train/loss', 'train/steps_per_sec']
    """
    _positive_int(steps, "fast_dev_run steps")
    seen: dict[str, float] = {}

    def record(run: Run) -> None:
        seen.update(run.latest)

    pure = lambda s, b: train_step(s, b)  # noqa: E731  (hides .donate: the caller's state stays valid)
    fit(
        state,
        pure,
        limit_batches(data, steps),
        num_steps=int(state.step) + steps,
        eval_step=eval_step,
        eval_data=limit_batches(eval_data, steps) if eval_data is not None else None,
        eval_every=steps if eval_step is not None else None,
        log_every=steps,
        progress=False,
        actions=[_AtEnd(record)],
    )
    return seen


class _AtEnd:
    order = 1000

    def __init__(self, fn: Callable[[Run], Any]):
        self.fn = fn

    def __call__(self, run: Run) -> None:
        pass

    def end(self, run: Run) -> None:
        self.fn(run)
