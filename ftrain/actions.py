"""Periodic actions: what :func:`ftrain.fit` does between steps, as small composable pieces.

``fit`` calls every action after every step with one argument, the :class:`Run`
(the step number, the current state, the time, the metrics published so far).
An action decides for itself whether it is its turn, usually with an
:class:`Every` trigger, so the cheap case (not its turn) costs one integer test
and never touches the device. Triggers take the step and the time as arguments:
tests drive them without sleeping.

The protocol (:class:`Action`) is just a callable ``action(run)``, with optional
``start(run)``, ``end(run)`` and ``abort(run)`` methods and two optional
attributes: ``order`` (actions run sorted by it; default 0) and
``keeps_old_states`` (True if the action holds on to earlier states, so ``fit``
must not let the step overwrite them; see :class:`StopOnNonFinite`).

Writing your own:
    >>> import ftrain
    >>> @ftrain.actions.every(100)
    ... def print_param_norm(run):
    ...     print(run.step, float(ftrain.tree.global_norm(run.state.params)))  # a host sync, every 100 steps

Then ``ftrain.fit(..., actions=[print_param_norm])``. To publish numbers that
writers, the progress bar, :class:`EarlyStopping` and the checkpoint manager see,
call ``run.publish("group", {"name": value})``.
"""

from __future__ import annotations

import math
import os
import time as _time
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import torch

from . import tree
from .metrics import Accumulator
from .writers import MultiWriter, format_scalar, is_rank_zero

__all__ = [
    "Action",
    "Checkpoint",
    "EarlyStopping",
    "Evaluate",
    "Every",
    "LogMetrics",
    "Periodic",
    "ProgressBar",
    "Profile",
    "Run",
    "StopOnNonFinite",
    "every",
]


class Run:
    """What an action sees of the running loop (built by :func:`ftrain.fit`; you rarely build one).

    Attributes:
        step: the number of steps taken, as a Python int (``int(state.step)`` at the
            start of ``fit``, plus one per call of the train step; no host sync).
        state: the state after the latest step.
        step_metrics: the latest step's metrics, as returned (0-d tensors on the device).
        train_metrics: the on-device :class:`~ftrain.metrics.Accumulator` of the train
            metrics since the last log.
        time: ``time.monotonic()`` after the latest step.
        epoch: completed passes over the data (``step // steps_per_epoch`` when the
            data has a length).
        num_steps: the step ``fit`` stops at (``None`` when it runs for a number of
            passes over data without a length).
        steps_per_epoch: ``len(data)``, or ``None``.
        latest: the last published value of every metric (``"train/loss"``, ``"val/acc"``, ...).
        new: the values published during the current step only.
        writer: the fan-out of ``fit``'s writers.
        data: the training data (for its ``state_dict()``).
        donating: whether the step overwrites its input state (``train_step.donate``).
        stop_reason: why the run stops, once an action has called :meth:`stop`.
        actions: all the actions of this run, in the order they run.

    Example:
        >>> import torch
        >>> run = Run(state=None, step=10, num_steps=100)
        >>> run.publish("val", {"loss": 0.5})
        >>> run.latest
        {'val/loss': 0.5}
    """

    def __init__(
        self,
        state: Any,
        *,
        step: int = 0,
        num_steps: int | None = None,
        steps_per_epoch: int | None = None,
        writer: MultiWriter | None = None,
        data: Any = None,
        donating: bool = False,
        actions: Iterable[Any] = (),
    ):
        self.state = state
        self.step = step
        self.start_step = step
        self.num_steps = num_steps
        self.steps_per_epoch = steps_per_epoch
        self.epoch = step // steps_per_epoch if steps_per_epoch else 0
        self.step_metrics: Mapping[str, torch.Tensor] = {}
        self.train_metrics = Accumulator()
        self.time = _time.monotonic()
        self.latest: dict[str, float] = {}
        self.new: dict[str, float] = {}
        self.writer = writer if writer is not None else MultiWriter([])
        self.data = data
        self.donating = donating
        self.actions = list(actions)
        self.stop_reason: str | None = None
        self.rolled_back = False

    def publish(self, group: str, values: Mapping[str, float]) -> None:
        """Record host values as ``group/name``: write them, make them ``latest`` and ``new``.

        Args:
            group: the prefix, e.g. ``"val"``.
            values: name -> Python float.
        """
        named = {f"{group}/{k}": float(v) for k, v in values.items()}
        self.writer.write_scalars(self.step, named)
        self.latest.update(named)
        self.new.update(named)

    def stop(self, reason: str, *, state: Any = None) -> None:
        """Ask ``fit`` to stop after this step.

        Args:
            reason: a sentence saying why (``fit`` keeps the first reason given).
            state: roll back to this earlier state: it becomes the result of ``fit``,
                and the remaining actions of this step are skipped (the step that
                triggered the roll back produced nothing worth evaluating or saving).
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        if state is not None:
            self.state = state
            self.step = int(state.step)  # a host sync, once
            self.rolled_back = True

    def groups(self) -> set[str]:
        """The metric groups the actions of this run publish (their ``publishes`` attributes)."""
        out: set[str] = set()
        for a in self.actions:
            out.update(getattr(a, "publishes", ()))
        return out


@runtime_checkable
class Action(Protocol):
    """An action: called with the :class:`Run` after every step.

    Optional: ``start(run)`` before the first step, ``end(run)`` after the last,
    ``abort(run)`` when the loop raises; ``order`` (int, default 0; lower runs
    first); ``publishes`` (the metric groups it publishes); ``keeps_old_states``.

    Example:
        >>> class CountSteps:
        ...     def __init__(self): self.n = 0
        ...     def __call__(self, run): self.n += 1
        >>> isinstance(CountSteps(), Action)
        True
    """

    def __call__(self, run: Run) -> None:
        """Act (or not) after a step."""


class Every:
    """A trigger: fires every ``steps`` steps, every ``epochs`` epochs (fractions allowed) and/or every ``seconds``.

    Steps count from 0 of the run (the state's step), so a resumed run keeps the
    same schedule. Time is passed in, never read: tests need no sleep. Used as a
    decorator, it turns a function ``fn(run)`` into a :class:`Periodic` action.

    Args:
        steps: fire when ``step % steps == 0``.
        epochs: fire each time ``step`` crosses a multiple of ``epochs * steps_per_epoch``
            (``0.5``: twice an epoch; needs data with a length).
        seconds: fire when at least this many seconds passed since it last fired
            (the first call only starts the clock).

    Example:
        >>> t = Every(3)
        >>> [s for s in range(1, 10) if t.should_run(s)]
        [3, 6, 9]
        >>> half = Every(epochs=0.5)
        >>> [s for s in range(1, 11) if half.should_run(s, steps_per_epoch=5)]
        [3, 5, 8, 10]
        >>> clock = Every(seconds=60)
        >>> clock.should_run(1, time=0.0), clock.should_run(2, time=59.0), clock.should_run(3, time=61.0)
        (False, False, True)
    """

    def __init__(self, steps: int | None = None, *, epochs: float | None = None, seconds: float | None = None):
        if steps is None and epochs is None and seconds is None:
            raise ValueError("Every needs at least one of steps=, epochs=, seconds=")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"Every: steps must be a positive int, got {steps!r}")
        for name, v in (("epochs", epochs), ("seconds", seconds)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"Every: {name} must be a positive number, got {v!r}")
        self.steps = steps
        self.epochs = Fraction(epochs).limit_denominator(10**6) if epochs is not None else None
        self.seconds = seconds
        self._last_time: float | None = None

    def should_run(self, step: int, time: float | None = None, steps_per_epoch: int | None = None) -> bool:
        """Whether to act after ``step`` at ``time`` (seconds, any fixed origin)."""
        fire = False
        if self.steps is not None and step % self.steps == 0:
            fire = True
        if self.epochs is not None:
            if not steps_per_epoch:
                raise ValueError(
                    "Every(epochs=...) needs the number of steps per epoch, but the data has no len(); "
                    "use Every(steps=...) instead, or data with a length"
                )
            interval = self.epochs * steps_per_epoch
            if math.floor(step / interval) > math.floor((step - 1) / interval):
                fire = True
        if self.seconds is not None:
            if time is None:
                raise ValueError("Every(seconds=...) needs the time: should_run(step, time=...)")
            if self._last_time is None:
                self._last_time = time
            elif time - self._last_time >= self.seconds:
                fire = True
        if fire and self.seconds is not None and time is not None:
            self._last_time = time
        return fire

    def __call__(self, fn: Callable[[Run], Any]) -> Periodic:
        """Decorate ``fn(run)`` into an action that calls it when this trigger fires."""
        return Periodic(fn, self)

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("steps", self.steps), ("epochs", self.epochs), ("seconds", self.seconds))]
        return f"Every({', '.join(p for p in parts if not p.endswith('=None'))})"


def every(steps: int | None = None, *, epochs: float | None = None, seconds: float | None = None) -> Every:
    """Shorthand for :class:`Every`; also a decorator that makes a function an action.

    Example:
        >>> @every(50)
        ... def hello(run):
        ...     print("step", run.step)
        >>> hello(Run(state=None, step=50))
        step 50
        >>> hello(Run(state=None, step=51))
    """
    return Every(steps, epochs=epochs, seconds=seconds)


def _trigger(value: int | float | Every | None, what: str) -> Every | None:
    """``int`` -> every N steps, ``float`` -> every N epochs, an :class:`Every` as is."""
    if value is None or isinstance(value, Every):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int (steps), a float (epochs) or ftrain.actions.every(...), got {value!r}")
    if isinstance(value, int):
        return Every(value)
    if isinstance(value, float):
        return Every(epochs=value)
    raise TypeError(
        f"{what} must be an int (steps), a float (epochs) or ftrain.actions.every(...), got {type(value).__name__}"
    )


class Periodic:
    """Call ``fn(run)`` whenever the trigger fires.

    Args:
        fn: the function to call with the :class:`Run`.
        every: an :class:`Every`, or an int (steps) or float (epochs).
        order: where it runs among the actions (default 0).

    Example:
        >>> seen = []
        >>> action = Periodic(lambda run: seen.append(run.step), every=2)
        >>> for s in range(1, 6):
        ...     action(Run(state=None, step=s))
        >>> seen
        [2, 4]
    """

    def __init__(self, fn: Callable[[Run], Any], every: Every | int | float, *, order: int = 0):
        self.fn = fn
        self.every = _trigger(every, "Periodic(every=...)")
        self.order = order

    def __call__(self, run: Run) -> None:
        if self.every.should_run(run.step, run.time, run.steps_per_epoch):
            self.fn(run)

    def __repr__(self) -> str:
        return f"Periodic({getattr(self.fn, '__name__', self.fn)!r}, {self.every})"


class LogMetrics:
    """Sync the train metrics accumulated on device, publish them as ``train/*``, reset.

    This is the only place the train metrics reach the host: once per interval,
    one transfer. Also publishes ``train/steps_per_sec`` over the interval.
    ``fit`` adds one with ``every=log_every``.

    Args:
        every: the interval (an int is steps).

    Example:
        >>> import torch
        >>> run = Run(state=None, step=0)
        >>> log = LogMetrics(every=2)
        >>> for s in (1, 2):
        ...     run.step = s
        ...     run.train_metrics.update({"loss": torch.tensor(float(s))})
        ...     log(run)
        >>> run.latest["train/loss"]
        1.5
    """

    order = -10
    publishes = ("train",)

    def __init__(self, every: Every | int | float = 50):
        self.every = _trigger(every, "LogMetrics(every=...)")
        self._since: tuple[int, float] | None = None

    def start(self, run: Run) -> None:
        self._since = (run.step, run.time)

    def __call__(self, run: Run) -> None:
        if self.every.should_run(run.step, run.time, run.steps_per_epoch):
            self._flush(run)

    def _flush(self, run: Run) -> None:
        if not run.train_metrics.count:
            return
        values = run.train_metrics.compute()  # the host sync of the train loop
        run.train_metrics.reset()
        since = self._since or (run.start_step, run.time)
        if run.step > since[0] and run.time > since[1]:
            values["steps_per_sec"] = (run.step - since[0]) / (run.time - since[1])
        self._since = (run.step, run.time)
        run.publish("train", values)

    def end(self, run: Run) -> None:
        self._flush(run)


class Evaluate:
    """Run :func:`ftrain.evaluate` on ``data`` when the trigger fires; publish as ``<prefix>/*``.

    Args:
        eval_step: ``eval_step(state, batch) -> metrics``.
        data: the evaluation batches (iterated afresh each time).
        every: the interval: an int (steps), a float (epochs, e.g. ``0.25``) or an :class:`Every`.
        prefix: the metric group (``"val"`` gives ``"val/loss"``).
        at_end: also evaluate the final state (unless the last step just did).

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> ev = Evaluate(lambda state, batch: {"loss": batch.sum()}, data=[torch.ones(2)], every=10)
        >>> run = Run(state=state, step=10)
        >>> ev(run)
        >>> run.latest
        {'val/loss': 2.0}
    """

    order = -20

    def __init__(
        self,
        eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]],
        data: Iterable[Any],
        *,
        every: Every | int | float | None = None,
        prefix: str = "val",
        at_end: bool = True,
    ):
        if not callable(eval_step):
            raise TypeError(f"Evaluate: eval_step must be callable, got {type(eval_step).__name__}")
        self.eval_step = eval_step
        self.data = data
        self.every = _trigger(every, "Evaluate(every=...)")
        self.prefix = prefix
        self.publishes = (prefix,)
        self.at_end = at_end
        self._last: int | None = None

    def __call__(self, run: Run) -> None:
        if self.every is not None and self.every.should_run(run.step, run.time, run.steps_per_epoch):
            self._evaluate(run)

    def _evaluate(self, run: Run) -> None:
        from .loop import evaluate

        run.publish(self.prefix, evaluate(run.state, self.eval_step, self.data))
        self._last = run.step

    def end(self, run: Run) -> None:
        if self.at_end and self._last != run.step:
            self._evaluate(run)


def _data_position(data: Any) -> dict | None:
    state_dict = getattr(data, "state_dict", None)
    return state_dict() if callable(state_dict) else None


class Checkpoint:
    """Save through a checkpoint manager on its schedule, and once more at the end.

    The manager is duck-typed: ``should_save(step) -> bool``, ``save(state, *, data,
    metrics, force)``, ``wait()`` (see :class:`ftrain.CheckpointManager`). The data
    position (``data.state_dict()``, when the data has one) and the latest published
    metrics (for keeping the best checkpoints) are saved with the state. It runs
    after the other actions, so a checkpoint sees this step's evaluation.

    When the step donates (overwrites its input state), the state is copied
    before an asynchronous save: the next step would otherwise write into the
    tensors the background writer is still reading. A manager whose
    ``copies_state`` is true (``ftrain.CheckpointManager`` by default) stages
    its own copy into reused buffers, so the action does not copy again.

    Args:
        manager: the checkpoint manager.
        save_at_end: save the final state (``force=True``) if this step was not saved already.

    Example:
        >>> class Manager:
        ...     def __init__(self): self.saved = []
        ...     def should_save(self, step): return step % 2 == 0
        ...     def save(self, state, *, data=None, metrics=None, force=False): self.saved.append(int(state.step))
        ...     def wait(self): pass
        >>> import torch
        >>> from types import SimpleNamespace
        >>> m = Manager()
        >>> ckpt = Checkpoint(m)
        >>> for s in (1, 2, 3):
        ...     ckpt(Run(state=SimpleNamespace(step=torch.tensor(s)), step=s))
        >>> m.saved
        [2]
    """

    order = 100

    def __init__(self, manager: Any, *, save_at_end: bool = True):
        missing = [m for m in ("should_save", "save", "wait") if not callable(getattr(manager, m, None))]
        if missing:
            raise TypeError(
                f"checkpoint= expects a checkpoint manager (ftrain.CheckpointManager); "
                f"a {type(manager).__name__} lacks {missing}"
            )
        self.manager = manager
        self.save_at_end = save_at_end
        self._last: int | None = None

    def __call__(self, run: Run) -> None:
        if self.manager.should_save(run.step):
            self._save(run, force=False)

    def _save(self, run: Run, force: bool) -> None:
        state = run.state
        if run.donating and not getattr(self.manager, "copies_state", False):
            state = tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
        self.manager.save(state, data=_data_position(run.data), metrics=dict(run.latest), force=force)
        self._last = run.step

    def end(self, run: Run) -> None:
        try:
            if self.save_at_end and self._last != run.step:
                self._save(run, force=True)
        finally:
            self.manager.wait()

    def abort(self, run: Run) -> None:
        # The loop failed: finish the writes already under way (they are valid checkpoints) and save nothing new.
        self.manager.wait()


class EarlyStopping:
    """Stop when a monitored metric has not improved for ``patience`` evaluations.

    It looks at the metric each time it is published (``run.new``); ``patience``
    counts publications, not steps. The metric's group (``"val"`` in
    ``"val/loss"``) must be published by some action of the run, and the first
    time that group is published without the metric, it raises, listing the
    metrics that exist.

    Args:
        monitor: the published name, e.g. ``"val/loss"`` or ``"val/acc"``.
        patience: how many publications without improvement to tolerate.
        min_delta: the smallest change that counts as an improvement.
        mode: ``"min"`` (lower is better) or ``"max"``.

    Example:
        >>> stop = EarlyStopping("val/loss", patience=1)
        >>> run = Run(state=None, step=0, actions=[stop, Evaluate(lambda s, b: {}, [])])
        >>> stop.start(run)
        >>> for step, loss in [(1, 1.0), (2, 0.5), (3, 0.6), (4, 0.7)]:
        ...     run.step, run.new = step, {"val/loss": loss}
        ...     stop(run)
        >>> run.stop_reason
        'EarlyStopping: val/loss did not improve by more than 0 for 2 evaluations (best 0.5 at step 2)'
    """

    order = 10

    def __init__(self, monitor: str, *, patience: int = 3, min_delta: float = 0.0, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str) or "/" not in monitor:
            raise ValueError(
                f"EarlyStopping: monitor must name a published metric as 'group/name' (e.g. 'val/loss'), got {monitor!r}"
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.group = monitor.rsplit("/", 1)[0]
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0

    def start(self, run: Run) -> None:
        groups = run.groups()
        if self.group not in groups:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r}, but no action of this run publishes metrics under "
                f"{self.group + '/'!r}; published groups: {sorted(groups)} (e.g. 'val/loss' needs eval_step= and "
                "eval_data=; a custom action declares its groups with a `publishes` attribute)"
            )

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def __call__(self, run: Run) -> None:
        if not run.new:
            return
        value = run.new.get(self.monitor)
        if value is None:
            if any(name.startswith(self.group + "/") for name in run.new):
                raise KeyError(
                    f"EarlyStopping monitors {self.monitor!r}, which was never produced; "
                    f"available metrics: {sorted(run.latest)}"
                )
            return
        if self._improved(value):
            self.best, self.best_step, self.bad = value, run.step, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            run.stop(
                f"EarlyStopping: {self.monitor} did not improve by more than {self.min_delta:g} for "
                f"{self.bad} evaluations (best {self.best:g} at step {self.best_step})"
            )


class StopOnNonFinite:
    """Stop at a non-finite loss and return the last good state.

    The "good" state is the one before the first update computed from a
    non-finite loss. To return it, this action keeps a reference to the last
    checked state, so ``fit`` calls the plain (pure) step instead of
    ``train_step.donate``: the step must not overwrite the state being kept.
    That costs the memory of one more state (no copy) and a host sync every
    ``every`` steps. With ``every > 1``, the losses are summed on the device
    between checks, and the run rolls back to the state at the last check;
    a checkpoint saved between two checks is not checked, so pick ``every``
    dividing the checkpoint interval (the default, 1, checks every state before
    any other action sees it).

    Args:
        metric: the step metric to check (default ``"loss"``).
        every: check every this many steps (1: exact, a sync per step).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> guard = StopOnNonFinite()
        >>> run = Run(state=SimpleNamespace(step=torch.tensor(0)), step=0)
        >>> guard.start(run)
        >>> run.state, run.step, run.step_metrics = SimpleNamespace(step=torch.tensor(1)), 1, {"loss": torch.tensor(float("nan"))}
        >>> guard(run)
        >>> run.step, run.stop_reason
        (0, 'StopOnNonFinite: loss is not finite at step 1; rolled back to step 0')
    """

    order = -100
    keeps_old_states = True

    def __init__(self, metric: str = "loss", *, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"StopOnNonFinite: every must be a positive int, got {every!r}")
        self.metric = metric
        self.every = every
        self._good: Any = None
        self._sum: torch.Tensor | None = None

    def start(self, run: Run) -> None:
        self._good = run.state
        self._sum = None

    def __call__(self, run: Run) -> None:
        value = run.step_metrics.get(self.metric)
        if value is None:
            raise KeyError(
                f"StopOnNonFinite checks {self.metric!r}, which the step does not return; "
                f"its metrics are {sorted(run.step_metrics)}"
            )
        value = value.detach()
        self._sum = value.float().clone() if self._sum is None else self._sum.add_(value)
        if run.step % self.every == 0:
            self._check(run)

    def _check(self, run: Run) -> None:
        total, self._sum = float(self._sum), None  # the host sync this action asks for
        if math.isfinite(total):
            self._good = run.state
            return
        run.stop(
            f"StopOnNonFinite: {self.metric} is not finite at step {run.step}"
            + (f" (or up to {self.every - 1} steps before: checked every {self.every})" if self.every > 1 else "")
            + f"; rolled back to step {int(self._good.step)}",
            state=self._good,
        )

    def end(self, run: Run) -> None:
        # Check the losses since the last check too: the run may end between checks.
        if self._sum is not None and not run.rolled_back:
            self._check(run)
        self._good = self._sum = None


class ProgressBar:
    """A tqdm progress bar (rate, ETA), moved and labelled only at its interval with host values.

    Between intervals it does nothing, so it never syncs the device. It shows
    the latest published ``train/*`` and ``val/*`` values. Under
    ``torch.distributed`` only rank 0 draws it.

    Args:
        every: the refresh interval (``fit`` uses ``log_every``).
        **tqdm_kwargs: passed to ``tqdm`` (e.g. ``file=``, ``disable=``, ``desc=``).

    Example:
        >>> import io
        >>> bar = ProgressBar(every=5, file=io.StringIO())
        >>> run = Run(state=None, step=0, num_steps=10)
        >>> bar.start(run)
        >>> for s in range(1, 11):
        ...     run.step = s
        ...     bar(run)
        >>> bar.end(run)
        >>> "10/10" in bar.file.getvalue()
        True
    """

    order = -5

    def __init__(self, every: Every | int | float = 50, **tqdm_kwargs: Any):
        self.every = _trigger(every, "ProgressBar(every=...)")
        self.tqdm_kwargs = tqdm_kwargs
        self.file = tqdm_kwargs.get("file")
        self._bar: Any = None

    def start(self, run: Run) -> None:
        if not is_rank_zero():  # one bar per job, not one per process
            return
        from tqdm.auto import tqdm

        kwargs = {"unit": "step", "dynamic_ncols": True, "desc": "fit", **self.tqdm_kwargs}
        self._bar = tqdm(total=run.num_steps, initial=run.step, **kwargs)

    def __call__(self, run: Run) -> None:
        if self._bar is not None and self.every.should_run(run.step, run.time, run.steps_per_epoch):
            self._refresh(run)

    def _refresh(self, run: Run) -> None:
        shown = {
            k.split("/", 1)[1] if k.startswith("train/") else k: format_scalar(v)
            for k, v in run.latest.items()
            if k != "train/steps_per_sec"
        }
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(run.step - self._bar.n)

    def end(self, run: Run) -> None:
        if self._bar is not None:
            self._refresh(run)
            self._bar.close()
            self._bar = None

    def abort(self, run: Run) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Profile:
    """Record ``steps`` steps with ``torch.profiler`` after step ``start``; write a Chrome trace.

    The trace goes to ``<directory>/trace_<first>_<last>.json`` (open it in
    ``chrome://tracing`` or Perfetto). CUDA activity is recorded when CUDA is available.

    Args:
        directory: where to write the trace.
        start: begin profiling after this step (skip the compile and warm-up steps).
        steps: how many steps to record.

    Example:
        >>> import tempfile
        >>> prof = Profile(tempfile.mkdtemp(), start=2, steps=2)
        >>> for s in range(1, 6):
        ...     prof(Run(state=None, step=s))
        >>> [p.rsplit("/", 1)[1] for p in prof.traces]
        ['trace_3_4.json']
    """

    order = 50

    def __init__(self, directory: str | os.PathLike, *, start: int = 10, steps: int = 5):
        if start < 0 or steps <= 0:
            raise ValueError(f"Profile: needs start >= 0 and steps > 0, got start={start}, steps={steps}")
        self.directory = os.fspath(directory)
        self.start_step = start
        self.steps = steps
        self.traces: list[str] = []
        self._prof: Any = None

    def __call__(self, run: Run) -> None:
        if self._prof is None and run.step == self.start_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        elif self._prof is not None and run.step >= self.start_step + self.steps:
            self._finish(run)

    def _finish(self, run: Run) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"trace_{self.start_step + 1}_{run.step}.json")
        prof.export_chrome_trace(path)
        self.traces.append(path)

    def end(self, run: Run) -> None:
        if self._prof is not None:
            self._finish(run)

    def abort(self, run: Run) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
