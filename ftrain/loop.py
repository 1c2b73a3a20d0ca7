"""The thin loop: :func:`fit`, :func:`evaluate`, :func:`predict`, and a few debugging helpers.

``fit`` iterates the data, calls the (compiled, pure) train step and then the
actions (:mod:`ftrain.actions`). That is all: evaluation, logging,
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

import contextlib
import importlib.util
import itertools
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from . import tree
from ._batches import add_note, check_data, length, to_device
from ._evaluate import evaluate, predict
from ._run import INTERRUPTED, Preempted, StopSignals, announce
from ._validate import check_int
from .actions import Action, Checkpoint, Evaluate, Every, LogMetrics, Periodic, ProgressBar, Run, as_action
from .checkpoint import PREEMPTION_SIGNALS, Checkpointer
from .writers import MultiWriter, Writer, to_writer

__all__ = ["evaluate", "fast_dev_run", "fit", "limit_batches", "overfit_batches", "predict"]

NOT_AN_ACTION = (
    "fit: actions[{i}] is a {kind}, not callable; an action is a callable action(run), "
    "e.g. ftrain.actions.EarlyStopping('val/loss') or @ftrain.actions.every(100) on a function"
)
EPOCHS_WITHOUT_LEN = (
    "fit: an interval in epochs ({every}) needs data with a len(), but {kind} has none; "
    "give eval_every/log_every (or the action's every=) in steps (an int) instead"
)
NO_LOAD_STATE_DICT = (
    "fit: the checkpoint holds a data position but the data ({kind}) has no load_state_dict; "
    "it restarts from its beginning (use ftrain.data.Loader for exact resume)"
)
NO_BATCHES = (
    "fit: the training data produced no batches ({kind}); check the dataset is not empty and that "
    "batch_size <= len(dataset) when drop_last=True"
)
RAN_OUT = (
    "fit: the training data ran out after {step} steps, before num_steps={num_steps}; an iterator or generator "
    "can be consumed only once: pass a re-iterable (a list, a DataLoader) to train longer"
)


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
    checkpoint: Checkpointer | None = None,
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
    An action that keeps earlier states (``keeps_old_states``, e.g.
    :class:`~ftrain.actions.StopOnNonFinite`) switches ``fit`` to the pure step.

    **Resume.** With ``checkpoint=manager`` and ``resume=True``, ``fit`` first
    restores the latest checkpoint in the manager's directory (and the data
    position, when ``data`` has ``load_state_dict``; a tracker writer such as
    ``writers.MLflow`` continues the run it saved), so running the same
    command again continues where it stopped. It saves when
    ``manager.should_save(step)``, once more at the end, and waits for async
    saves before returning.

    **Stopping early.** Ctrl-C finishes the step under way, runs the actions'
    ``end`` (the final checkpoint, the writers flushed) and returns the state;
    ``run.stop_reason`` is ``"interrupted"`` (a second Ctrl-C stops at once).
    With a checkpoint manager, SIGTERM and SIGUSR1 (the manager's
    ``preemption_signals``) save at the next step boundary and then raise
    :class:`ftrain.Preempted`, a ``SystemExit`` with code ``128 + signal``.
    Any other error completes the saves already under way (nothing new is
    written), flushes the writers, and carries the state after the last
    completed step as ``error.state``. The previous signal handlers are back
    when ``fit`` returns or raises.

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
        >>> def loss_fn(apply, params, buffers, batch, key):  # a least-squares fit of y on x
        ...     return torch.nn.functional.mse_loss(apply(params, buffers, batch[0])[0], batch[1])
        >>> train_step = ftrain.make_train_step(loss_fn, compile=False)
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))] * 4
        >>> state = ftrain.fit(state, train_step, data, num_epochs=2, progress=False)
        >>> int(state.step)
        8
    """
    _check_arguments(state, train_step, data, num_steps, num_epochs, eval_step, eval_data, eval_every)
    steps_per_epoch = length(data)
    evaluation = _evaluation(eval_step, eval_data, eval_every, steps_per_epoch)
    writer = to_writer(log)
    saver = Checkpoint(checkpoint) if checkpoint is not None else None
    acts = _build_actions(actions, log_every, evaluation, saver, progress=progress)
    _check_epoch_intervals(acts, data, steps_per_epoch)
    total, passes = _horizon(num_steps, num_epochs, steps_per_epoch)

    resumed = False
    if saver is not None and resume:
        state, resumed = _resume(state, data, saver.manager, writer)
    start = int(state.step)  # the one host sync before the loop; from here the loop counts steps itself
    if total is not None and start >= total:
        return state

    step_fn = _step_function(train_step, acts)
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
    preemption = getattr(checkpoint, "preemption_signals", PREEMPTION_SIGNALS) if checkpoint is not None else ()
    _drive(run, step_fn, _passes(data, run, passes, resumed), hparams, StopSignals(preemption))
    if run.signal is not None and run.signal != signal.SIGINT:
        raise Preempted(run.signal, run.state, run.step)
    return run.state


# ---- fit, step by step ----


def _check_arguments(state, train_step, data, num_steps, num_epochs, eval_step, eval_data, eval_every) -> None:
    # Everything is checked before the first (possibly slow, compiling) step.
    if not isinstance(getattr(state, "step", None), torch.Tensor):
        raise TypeError(f"fit: state must be an ftrain.TrainState (with a step tensor), got {type(state).__name__}")
    if not callable(train_step):
        raise TypeError(f"fit: train_step must be callable, got {type(train_step).__name__}")
    check_data(data, "fit: data")
    for name, value in (("num_steps", num_steps), ("num_epochs", num_epochs)):
        if value is not None:
            check_int(value, name, who="fit")
    if num_steps is not None and num_epochs is not None:
        raise ValueError(f"fit: pass num_steps or num_epochs, not both (got {num_steps} and {num_epochs})")
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: eval_step and eval_data go together; pass both or neither")
    if eval_every is not None and eval_step is None:
        raise ValueError("fit: eval_every needs eval_step= and eval_data=")
    if eval_data is not None:
        check_data(eval_data, "fit: eval_data")
    if length(data) == 0:
        raise ValueError(f"fit: the training data is empty (len(data) == 0, a {type(data).__name__})")


def _evaluation(eval_step, eval_data, eval_every, steps_per_epoch: int | None) -> Evaluate | None:
    if eval_step is None:
        return None
    if eval_every is None and steps_per_epoch is not None:
        eval_every = Every(epochs=1)  # the default: once per epoch (and always at the end)
    return Evaluate(eval_step, eval_data, every=Every.of(eval_every, "fit: eval_every"))


def _build_actions(
    actions: Iterable[Callable[[Run], Any]],
    log_every: int | Every,
    evaluation: Evaluate | None,
    saver: Checkpoint | None,
    *,
    progress: bool,
) -> list[Action]:
    """fit's own actions and the user's, sorted by ``order`` (a stable sort: ties keep this order)."""
    actions = list(actions)
    for i, a in enumerate(actions):
        if not callable(a):
            raise TypeError(NOT_AN_ACTION.format(i=i, kind=type(a).__name__))
    log_trigger = Every.of(log_every, "fit: log_every")
    built: list[Action] = [LogMetrics(log_trigger)]
    if evaluation is not None:
        built.append(evaluation)
    if progress and importlib.util.find_spec("tqdm") is not None:
        built.append(ProgressBar(log_trigger))  # the same trigger: each action keeps its own clock
    if saver is not None:
        built.append(saver)
    yours = [as_action(a) for a in actions]  # wrapped once: from here every action has every member
    return sorted([*built, *yours], key=lambda a: a.order)


def _check_epoch_intervals(acts: list[Action], data: Iterable[Any], steps_per_epoch: int | None) -> None:
    if steps_per_epoch is not None:
        return
    for a in acts:
        if isinstance(a, Periodic) and a.every is not None and a.every.epochs is not None:
            raise ValueError(EPOCHS_WITHOUT_LEN.format(every=a.every, kind=type(data).__name__))


def _horizon(
    num_steps: int | None, num_epochs: int | None, steps_per_epoch: int | None
) -> tuple[int | None, int | None]:
    """(the step to stop at, or None; the number of passes over the data, or None for "until that step")."""
    if num_steps is not None:
        return num_steps, None
    num_epochs = num_epochs or 1  # neither given: one pass
    if steps_per_epoch is not None:
        return num_epochs * steps_per_epoch, None
    return None, num_epochs


def _resume(state: Any, data: Any, manager: Checkpointer, writer: MultiWriter) -> tuple[Any, bool]:
    """The latest checkpoint's state (``state`` if there is none), and whether the data position was restored.

    The writers that log into a tracker's run continue the run the checkpoint names.
    """
    restored = manager.restore_latest(state)
    if restored is None:
        return state, False
    state, extras = restored
    writer.resume_runs((extras or {}).get("trackers") or {})
    position = (extras or {}).get("data")
    if position is None:
        return state, False
    if not callable(getattr(data, "load_state_dict", None)):
        warnings.warn(NO_LOAD_STATE_DICT.format(kind=type(data).__name__), RuntimeWarning, stacklevel=3)
        return state, False
    data.load_state_dict(position)
    return state, True


def _step_function(train_step: Callable, acts: list[Action]) -> Callable:
    # The donating variant reuses the state's memory, unless an action holds on to earlier states.
    donate = getattr(train_step, "donate", None)
    if callable(donate) and not any(a.keeps_old_states for a in acts):
        return donate
    return train_step


def _epoch_samplers(data: Any) -> list[Any]:
    """The samplers of a DataLoader that take ``set_epoch`` (a ``DistributedSampler``)."""
    found = []
    for sampler in (getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)) and all(sampler is not f for f in found):
            found.append(sampler)
    return found


def _passes(data: Any, run: Run, passes: int | None, resumed: bool) -> Iterator[Any]:
    """The batches of up to ``passes`` passes over ``data`` (forever if None); counts epochs on ``run``."""
    seen_any = False
    empty_before = not resumed  # a resumed loader may sit at the end of an epoch: one empty pass is fine then
    done = 0
    samplers = _epoch_samplers(data)
    while passes is None or done < passes:
        n = 0
        for sampler in samplers:  # a DistributedSampler reshuffles only when told the epoch
            sampler.set_epoch(run.epoch)
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
            raise ValueError(NO_BATCHES.format(kind=type(data).__name__))
        # stacklevel: _passes <- _loop <- _drive <- fit <- the caller of fit
        warnings.warn(RAN_OUT.format(step=run.step, num_steps=run.num_steps), RuntimeWarning, stacklevel=5)
        return


def _drive(
    run: Run, step_fn: Callable, batches: Iterator[Any], hparams: Mapping[str, Any] | None, stops: StopSignals
) -> None:
    """Start the actions, loop, end them; on an error, abort them and re-raise it carrying the state."""
    try:
        with stops:
            if hparams:
                run.writer.write_hparams(hparams)
            for a in run.actions:
                a.start(run)
            _loop(run, step_fn, batches, stops)
            if run.signal is not None:
                announce(f"ftrain.fit: {run.stop_reason} at step {run.step}; ending the actions (the final checkpoint)")
            for a in run.actions:
                a.end(run)
    except BaseException as error:
        for a in run.actions:
            try:
                a.abort(run)
            except Exception as e:  # the original error matters more; keep it
                warnings.warn(f"fit: {a!r}.abort failed while unwinding: {e!r}", stacklevel=3)
        with contextlib.suppress(AttributeError):  # (an exception type with __slots__ cannot carry it)
            error.state = run.state  # the state after the last completed step: the work is not lost
        raise
    finally:
        batches.close()  # release DataLoader workers
        run.writer.flush()


def _loop(run: Run, step_fn: Callable, batches: Iterator[Any], stops: StopSignals) -> None:
    """The hot loop: no host sync here; actions decide when to look at values."""
    acts, total = run.actions, run.num_steps
    monotonic = time.monotonic
    metrics_update = run.train_metrics.update
    device = tree.device_of(run.state, default=None)
    # Batches come from host memory; on a CPU state there is nothing to move (and mapping over
    # the batch would cost more than a small step's compiled call).
    move = device.type != "cpu"
    first = True
    while total is None or run.step < total:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except KeyboardInterrupt:  # raised between steps, not by a second Ctrl-C: the state is whole
            if stops.forced:
                raise
            run.stop_reason, run.signal = INTERRUPTED, signal.SIGINT
            break
        except Exception as e:
            add_note(
                e,
                f"ftrain.fit: the data raised while producing the batch for step {run.step + 1} (epoch {run.epoch}); "
                "checkpoints already written are intact",
            )
            raise
        if move:
            batch = to_device(batch, device)
        try:
            state, metrics = step_fn(run.state, batch)
        except Exception as e:
            add_note(e, f"ftrain.fit: train_step raised at step {run.step + 1} (epoch {run.epoch})")
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
        try:
            for a in acts:
                a(run)
                if run.rolled_back:
                    break
        except KeyboardInterrupt:
            if stops.forced:
                raise
            run.stop_reason, run.signal = INTERRUPTED, signal.SIGINT
            break
        if run.stop_reason is not None:
            break
        stop = stops.stop_reason()  # a signal since the last boundary (on every rank: the same answer)
        if stop is not None:
            run.stop_reason, run.signal = stop
            break


# ---- debugging helpers ----


class _Limited:
    def __init__(self, data: Iterable[Any], n: int):
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)

    def __len__(self) -> int:
        n = length(self.data)
        return self.n if n is None else min(self.n, n)


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
    check_int(n, "n", who="limit_batches")
    check_data(data, "limit_batches: data")
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
    check_int(n, "n", who="overfit_batches")
    check_data(data, "overfit_batches: data")
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
        ['train/grad_norm', 'train/loss', 'train/lr', 'train/steps_per_sec']
    """
    check_int(steps, "steps", who="fast_dev_run")
    seen: dict[str, float] = {}
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
        actions=[_AtEnd(lambda run: seen.update(run.latest))],
    )
    return seen


class _AtEnd(Action):
    order = 1000  # after every other action has flushed what it publishes

    def __init__(self, fn: Callable[[Run], Any]):
        self.fn = fn

    def end(self, run: Run) -> None:
        self.fn(run)
