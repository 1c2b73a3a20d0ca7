"""Actions: what :func:`ftrain.fit` does between steps, as small composable pieces.

``fit`` calls every action after every step with one argument, the :class:`Run`
(the step number, the current state, the time, the metrics published so far).
An action decides for itself whether it is its turn, usually with an
:class:`Every` trigger, so the cheap case (not its turn) costs one integer test
and never touches the device.

The contract is the :class:`Action` base class: ``__call__(run)`` after each
step, ``start``/``end``/``abort`` hooks and the ``order``, ``publishes`` and
``keeps_old_states`` attributes, each with a default. A plain function is an
action too (``fit`` wraps it with :func:`as_action`).

The vocabulary of schedules: an :class:`Every` is an immutable trigger value
(every N steps, epochs and/or seconds); :func:`every` builds one; a
:class:`Periodic` action runs when its trigger fires and keeps the trigger's
clock, so one ``Every`` can be shared by several actions. Time is passed in,
never read: tests drive actions with :class:`Run` objects, without sleeping.

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
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass
from fractions import Fraction
from typing import Any

import torch

from . import tree
from ._batches import to_device
from ._evaluate import evaluate
from ._run import Run
from ._step import loss_and_grad, step_key
from ._summary import Summary, peak_flops, summary
from ._validate import check_int, check_number, check_one_of
from .checkpoint import Checkpointer
from .mesh import Mesh
from .writers import Console, Histogram, format_scalar, is_rank_zero

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
    "as_action",
    "every",
]


class Action:
    """What :func:`ftrain.fit` runs after every step: subclass it and override what you need.

    Every member has a default, so ``fit`` reads them directly. ``fit`` calls
    ``start`` on every action before the first step, the action itself after
    each step (sorted by ``order``), then ``end`` after the last step; if the
    loop raises, it calls ``abort`` instead of ``end`` and re-raises.

    Attributes:
        order: actions run sorted by it, lowest first. The built-in ones:
            StopOnNonFinite -100, Evaluate -20, LogMetrics -10, ProgressBar -5,
            yours 0, EarlyStopping 10, Profile 50, Checkpoint 100 (it sees this
            step's evaluation).
        publishes: the metric groups it publishes with ``run.publish`` (``("val",)``);
            :class:`EarlyStopping` checks that the group it monitors is among them.
        keeps_old_states: True if it holds on to earlier states; ``fit`` then calls
            the pure step instead of ``train_step.donate``, which would overwrite them.

    Example:
        >>> class CountSteps(Action):
        ...     def start(self, run): self.n = 0
        ...     def __call__(self, run): self.n += 1
        >>> counter = CountSteps()
        >>> counter.start(Run(state=None)); counter(Run(state=None)); counter.n
        1
    """

    order: int = 0
    publishes: tuple[str, ...] = ()
    keeps_old_states: bool = False

    def __call__(self, run: Run) -> None:
        """Act (or not: most steps are not an action's turn) after a step."""

    def start(self, run: Run) -> None:
        """Before the first step (reset what a previous run left)."""

    def end(self, run: Run) -> None:
        """After the last step: flush, save, close."""

    def abort(self, run: Run) -> None:
        """When the loop raises: release what ``start`` acquired; the loop's error propagates."""


class _Wrapped(Action):
    # A callable that does not subclass Action: the members it declares, the defaults for the rest.
    def __init__(self, fn: Callable[[Run], Any]):
        self.fn = fn
        self.order = getattr(fn, "order", Action.order)
        self.publishes = tuple(getattr(fn, "publishes", Action.publishes))
        self.keeps_old_states = bool(getattr(fn, "keeps_old_states", Action.keeps_old_states))
        for hook in ("start", "end", "abort"):
            method = getattr(fn, hook, None)
            if callable(method):  # an attribute that happens to share the name (e.g. start=10) is not a hook
                setattr(self, hook, method)

    def __call__(self, run: Run) -> None:
        self.fn(run)

    def __repr__(self) -> str:
        return f"as_action({getattr(self.fn, '__name__', self.fn)!r})"


def as_action(action: Callable[[Run], Any]) -> Action:
    """``action`` as an :class:`Action`: an Action as it is, any other callable wrapped once.

    A callable that does not subclass :class:`Action` may still declare some of its
    members (an ``order`` attribute, a ``start`` method, ...): they are read once,
    here, and the defaults fill in the rest. ``fit`` calls this on each of its ``actions``.

    Example:
        >>> def note(run): pass
        >>> note.order = 5
        >>> wrapped = as_action(note)
        >>> wrapped.order, wrapped.publishes, wrapped.keeps_old_states
        (5, (), False)
    """
    if isinstance(action, Action):
        return action
    if not callable(action):
        raise TypeError(f"as_action: an action is a callable action(run), got a {type(action).__name__}")
    return _Wrapped(action)


INTERVAL = "{what} must be an int (steps), a float (epochs) or ftrain.actions.every(...), got {value}"


@dataclass(frozen=True, repr=False)
class Every:
    """A trigger: fires every ``steps`` steps, every ``epochs`` epochs (fractions allowed) and/or every ``seconds``.

    An ``Every`` is an immutable value: it answers "is it time?" from the step and
    the time it is given, and the one thing that changes, when it last fired, is
    kept by the action that uses it (:class:`Periodic`). Steps count from 0 of the
    run (the state's step), so a resumed run keeps the same schedule. Used as a
    decorator, it turns a function ``fn(run)`` into a :class:`Periodic` action.

    Args:
        steps: fire when ``step % steps == 0``.
        epochs: fire each time ``step`` crosses a multiple of ``epochs * steps_per_epoch``
            (``0.5``: twice an epoch; needs data with a length).
        seconds: fire when at least this many seconds passed since it last fired
            (the action's first call only starts the clock).

    Example:
        >>> [s for s in range(1, 10) if Every(3).should_run(s)]
        [3, 6, 9]
        >>> half = Every(epochs=0.5)
        >>> [s for s in range(1, 11) if half.should_run(s, steps_per_epoch=5)]
        [3, 5, 8, 10]
        >>> clock = Every(seconds=60)
        >>> clock.should_run(2, time=59.0, since=0.0), clock.should_run(3, time=61.0, since=0.0)
        (False, True)
    """

    steps: int | None = None
    _: KW_ONLY
    epochs: float | Fraction | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None and self.seconds is None:
            raise ValueError("Every needs at least one of steps=, epochs=, seconds=")
        if self.steps is not None:
            check_int(self.steps, "steps", who="Every")
        for name in ("epochs", "seconds"):
            value = getattr(self, name)
            if value is not None:  # a Fraction is what epochs= becomes (dataclasses.replace passes it back)
                check_number(
                    float(value) if isinstance(value, Fraction) else value, name, who="Every", low=0, open_low=True
                )
        if self.epochs is not None:  # exact, so 1/3 of an epoch fires on the same steps every epoch
            object.__setattr__(self, "epochs", Fraction(self.epochs).limit_denominator(10**6))

    @classmethod
    def of(cls, value: int | float | Every | None, what: str) -> Every | None:
        """An interval as a trigger: an int is steps, a float epochs, an ``Every`` (or None) is kept.

        Args:
            value: the interval.
            what: who asks, for the error (``"fit: log_every"``).

        Example:
            >>> Every.of(100, "fit: log_every"), Every.of(0.5, "fit: eval_every")
            (Every(steps=100), Every(epochs=1/2))
        """
        if value is None or isinstance(value, Every):
            return value
        if isinstance(value, bool):
            raise TypeError(INTERVAL.format(what=what, value=repr(value)))
        if isinstance(value, int):
            return cls(value)
        if isinstance(value, float):
            return cls(epochs=value)
        raise TypeError(INTERVAL.format(what=what, value=type(value).__name__))

    def should_run(
        self, step: int, time: float | None = None, steps_per_epoch: int | None = None, *, since: float | None = None
    ) -> bool:
        """Whether to act after ``step`` at ``time``.

        Args:
            step: the step just taken.
            time: seconds, any fixed origin (needed with ``seconds=``).
            steps_per_epoch: ``len(data)`` (needed with ``epochs=``).
            since: when the caller last fired (or started its clock), on ``time``'s origin;
                ``None``: its clock has not started, so ``seconds=`` does not fire yet.
        """
        fire = self.steps is not None and step % self.steps == 0
        if self.epochs is not None:
            if not steps_per_epoch:
                raise ValueError(
                    "Every(epochs=...) needs the number of steps per epoch, but the data has no len(); "
                    "use Every(steps=...) instead, or data with a length"
                )
            interval = self.epochs * steps_per_epoch
            fire = fire or math.floor(step / interval) > math.floor((step - 1) / interval)
        if self.seconds is not None:
            if time is None:
                raise ValueError("Every(seconds=...) needs the time: should_run(step, time=...)")
            fire = fire or (since is not None and time - since >= self.seconds)
        return fire

    def __call__(self, fn: Callable[[Run], Any]) -> Periodic:
        """Decorate ``fn(run)`` into an action that calls it when this trigger fires."""
        return Periodic(fn, self)

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("steps", self.steps), ("epochs", self.epochs), ("seconds", self.seconds))]
        return f"Every({', '.join(p for p in parts if not p.endswith('=None'))})"


def every(steps: int | None = None, *, epochs: float | None = None, seconds: float | None = None) -> Every:
    """Build an :class:`Every`; also a decorator that makes a function a periodic action.

    Example:
        >>> @every(50)
        ... def hello(run):
        ...     print("step", run.step)
        >>> hello(Run(state=None, step=50))
        step 50
        >>> hello(Run(state=None, step=51))
    """
    return Every(steps, epochs=epochs, seconds=seconds)


class Periodic(Action):
    """An action that runs when its trigger fires; the trigger's clock (when it last fired) lives here.

    ``Periodic(fn, every)`` calls ``fn(run)``. :class:`LogMetrics`, :class:`Evaluate`
    and :class:`ProgressBar` are periodic actions too: a subclass passes ``fn=None``
    and overrides :meth:`act`. As each action keeps its own clock, one :class:`Every`
    can be handed to several actions and fires for each of them.

    Args:
        fn: the function to call with the :class:`Run` (None in a subclass that overrides ``act``).
        every: an :class:`Every`, an int (steps) or a float (epochs); None: never (a subclass
            may still act at the end).
        order: where it runs among the actions (default: the class's ``order``, 0).

    Example:
        >>> seen = []
        >>> action = Periodic(lambda run: seen.append(run.step), every=2)
        >>> for s in range(1, 6):
        ...     action(Run(state=None, step=s))
        >>> seen
        [2, 4]
    """

    def __init__(self, fn: Callable[[Run], Any] | None, every: Every | int | float | None, *, order: int | None = None):
        if type(self).act is Periodic.act and not callable(fn):
            raise TypeError(f"Periodic: fn must be a function to call as fn(run), got {fn!r}")
        self.fn = fn
        self.every = Every.of(every, f"{type(self).__name__}(every=...)")
        if order is not None:
            self.order = check_int(order, "order", who=type(self).__name__, low=None)
        self._fired_at: float | None = None  # run.time when the trigger last fired, or its clock started

    def start(self, run: Run) -> None:
        self._fired_at = None  # a new run: the clock starts at its first step

    def __call__(self, run: Run) -> None:
        if self.due(run):
            self.act(run)

    def due(self, run: Run) -> bool:
        """Whether the trigger fires after this step; moves this action's clock."""
        if self.every is None:
            return False
        fired = self.every.should_run(run.step, run.time, run.steps_per_epoch, since=self._fired_at)
        if fired or self._fired_at is None:
            self._fired_at = run.time
        return fired

    def act(self, run: Run) -> None:
        """What to do when due: call ``fn(run)``."""
        self.fn(run)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.fn, '__name__', self.fn)!r}, {self.every})"


class LogMetrics(Periodic):
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
        super().__init__(None, every)
        self._since: tuple[int, float] | None = None  # (step, time) of the last flush: the rate's interval

    def start(self, run: Run) -> None:
        super().start(run)
        self._since = (run.step, run.time)

    def act(self, run: Run) -> None:
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
        self.act(run)


class Evaluate(Periodic):
    """Run :func:`ftrain.evaluate` on ``data`` when the trigger fires; publish as ``<prefix>/*``.

    Args:
        eval_step: ``eval_step(state, batch) -> metrics``.
        data: the evaluation batches (iterated afresh each time).
        every: the interval: an int (steps), a float (epochs, e.g. ``0.25``) or an :class:`Every`;
            None: only at the end.
        prefix: the metric group (``"val"`` gives ``"val/loss"``).
        at_end: also evaluate the final state (unless the last step just did, or a signal
            stopped the run: Ctrl-C and a preemption want out, not a full evaluation).
        reductions: per-metric reductions other than the weighted mean (see :func:`ftrain.evaluate`).
        mesh: evaluate on every rank of this :class:`ftrain.Mesh`, each its own slice of ``data``
            (see :func:`ftrain.evaluate`); every rank publishes the result over the whole set.

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
        reductions: Mapping[str, str] | None = None,
        mesh: Mesh | None = None,
    ):
        if not callable(eval_step):
            raise TypeError(f"Evaluate: eval_step must be callable, got {type(eval_step).__name__}")
        super().__init__(None, every)
        self.eval_step = eval_step
        self.data = data
        self.prefix = prefix
        self.publishes = (prefix,)
        self.at_end = at_end
        self.reductions = reductions
        self.mesh = mesh
        self._last: int | None = None  # the step last evaluated

    def act(self, run: Run) -> None:
        metrics = evaluate(run.state, self.eval_step, self.data, reductions=self.reductions, mesh=self.mesh)
        run.publish(self.prefix, metrics)
        self._last = run.step

    def end(self, run: Run) -> None:
        if self.at_end and self._last != run.step and run.signal is None:
            self.act(run)


def _data_position(data: Any) -> dict | None:
    state_dict = getattr(data, "state_dict", None)
    return state_dict() if callable(state_dict) else None


# What Checkpoint calls, then the rest of the Checkpointer protocol: a missing member is named in that order.
_CALLED = ("should_save", "save", "wait")
_DECLARED = ("restore_latest", "close", "copies_state")
NOT_A_CHECKPOINTER = (
    "checkpoint= expects a checkpoint manager, an ftrain.checkpoint.Checkpointer such as ftrain.CheckpointManager; "
    "a {kind} lacks {missing} (a manager of your own declares should_save, save, restore_latest, wait, close "
    "and copies_state)"
)


class Checkpoint(Action):
    """Save through a checkpoint manager on its schedule, and once more at the end.

    The manager is an :class:`ftrain.checkpoint.Checkpointer` (such as
    :class:`ftrain.CheckpointManager`). The data position (``data.state_dict()``,
    when the data has one) and the latest published metrics (for keeping the best
    checkpoints) are saved with the state, and so are the run ids of the writers that log
    into a tracker's run (:class:`ftrain.writers.MLflow`, :class:`~ftrain.writers.WandB`), so
    a resumed ``fit`` continues those runs. It runs after the other actions, so a
    checkpoint sees this step's evaluation.

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
        ...     copies_state = False
        ...     def __init__(self): self.saved = []
        ...     def should_save(self, step): return step % 2 == 0
        ...     def save(self, state, *, data=None, metrics=None, force=False): self.saved.append(int(state.step))
        ...     def restore_latest(self, template): return None
        ...     def wait(self): pass
        ...     def close(self): pass
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

    def __init__(self, manager: Checkpointer, *, save_at_end: bool = True):
        if not isinstance(manager, Checkpointer):
            groups = [[m for m in names if not hasattr(manager, m)] for names in (_CALLED, _DECLARED)]
            missing = " and ".join(str(g) for g in groups if g)
            raise TypeError(NOT_A_CHECKPOINTER.format(kind=type(manager).__name__, missing=missing))
        self.manager = manager
        self.save_at_end = save_at_end
        self._last: int | None = None  # the step last saved

    def __call__(self, run: Run) -> None:
        if self.manager.should_save(run.step):
            self._save(run, force=False)

    def _save(self, run: Run, force: bool) -> None:
        state = run.state
        if run.donating and not self.manager.copies_state:
            state = tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
        # The trackers' run ids go only to a manager that gets some (one of your own may not take them).
        runs = run.writer.run_ids()
        extra = {"trackers": runs} if runs else {}
        self.manager.save(state, data=_data_position(run.data), metrics=dict(run.latest), force=force, **extra)
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


class EarlyStopping(Action):
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
        if not isinstance(monitor, str) or "/" not in monitor:
            raise ValueError(
                f"EarlyStopping: monitor must name a published metric as 'group/name' (e.g. 'val/loss'), got {monitor!r}"
            )
        self.monitor = monitor
        self.group = monitor.rsplit("/", 1)[0]
        self.patience = check_int(patience, "patience", who="EarlyStopping", low=0)
        self.min_delta = check_number(min_delta, "min_delta", who="EarlyStopping", low=0)
        self.mode = check_one_of(mode, "mode", ("min", "max"), who="EarlyStopping")
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


class StopOnNonFinite(Action):
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
        self.metric = metric
        self.every = check_int(every, "every", who="StopOnNonFinite")
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


class ProgressBar(Periodic):
    """A tqdm progress bar (rate, ETA), moved and labelled only at its interval with host values.

    Between intervals it does nothing, so it never syncs the device. It shows
    the latest published ``train/*`` and ``val/*`` values. Under
    ``torch.distributed`` only rank 0 draws it. On a terminal the bar stays at the
    bottom and :class:`ftrain.writers.Console` lines print above it. When its stream is
    not a terminal (a pipe, CI, a cluster log) it never redraws: it prints the bar's text
    as one plain line per interval, or nothing when a ``Console`` writer already prints
    one.

    Args:
        every: the refresh interval (``fit`` uses ``log_every``).
        plain: force the plain lines (``True``) or the bar (``False``); ``None``: by
            whether the stream is a terminal.
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

    def __init__(self, every: Every | int | float = 50, *, plain: bool | None = None, **tqdm_kwargs: Any):
        super().__init__(None, every)
        self.tqdm_kwargs = tqdm_kwargs
        self.file = tqdm_kwargs.get("file")
        self.plain = plain
        self._bar: Any = None
        self._lines: _PlainLines | None = None

    def start(self, run: Run) -> None:
        super().start(run)
        if not is_rank_zero():  # one bar per job, not one per process
            return
        stream = self.file if self.file is not None else sys.stderr
        plain = self.plain if self.plain is not None else not _is_terminal(stream)
        kwargs = {"unit": "step", "dynamic_ncols": True, "desc": "fit", **self.tqdm_kwargs}
        if plain:
            if self.tqdm_kwargs.get("disable") or any(isinstance(w, Console) for w in run.writer.writers):
                return  # the Console line is this interval's one line
            kwargs = {"file": stream, **kwargs}
            self._bar = self._lines = _PlainLines(total=run.num_steps, initial=run.step, start=run.time, **kwargs)
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=run.num_steps, initial=run.step, **kwargs)

    def act(self, run: Run) -> None:
        if self._bar is not None:
            self._refresh(run)

    def _refresh(self, run: Run) -> None:
        shown = {
            k.split("/", 1)[1] if k.startswith("train/") else k: format_scalar(v)
            for k, v in run.latest.items()
            if k != "train/steps_per_sec"
        }
        self._bar.set_postfix(shown, refresh=False)
        if self._lines is not None:
            self._lines.show(run.step, run.time)
        else:
            self._bar.update(run.step - self._bar.n)

    def end(self, run: Run) -> None:
        if self._bar is not None:
            self._refresh(run)
            self.abort(run)

    def abort(self, run: Run) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = self._lines = None


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_PLAIN_LINE = "{desc} {n_fmt}/{total_fmt} {percentage:3.0f}% [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_PLAIN_LINE_NO_TOTAL = "{desc} {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _PlainLines:
    """The progress bar's text (tqdm's ``format_meter``) as one plain line per refresh, never redrawn."""

    def __init__(self, *, total: int | None, initial: int, start: float, file: Any, desc: str, unit: str, **_: Any):
        self.total, self.n, self.start, self.file, self.desc, self.unit = total, initial, start, file, desc, unit
        self.initial, self.postfix, self._shown_at = initial, "", None

    def set_postfix(self, values: Mapping[str, str], refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def show(self, step: int, now: float) -> None:
        if step == self._shown_at:
            return  # the end's refresh after an interval's: one line per step at most
        from tqdm import tqdm

        self.n, self._shown_at = step, step
        elapsed = max(now - self.start, 0.0)
        rate = (step - self.initial) / elapsed if elapsed > 0 else None
        # tqdm's own text without the bar's blocks, which a log file shows as noise
        shape = _PLAIN_LINE if self.total is not None else _PLAIN_LINE_NO_TOTAL
        line = tqdm.format_meter(
            step, self.total, elapsed, prefix=self.desc, unit=self.unit, rate=rate, postfix=self.postfix or None,
            initial=self.initial, bar_format=shape,
        )  # fmt: skip
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        """Nothing to clear: the lines stay."""


class Profile(Action):
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
        self.directory = os.fspath(directory)
        self.start_step = check_int(start, "start", who="Profile", low=0)
        self.steps = check_int(steps, "steps", who="Profile")
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


class Summarize(Action):
    """At the start of ``fit``: :func:`ftrain.summary` of the state, printed and published as ``summary/*``.

    Publishes ``summary/params``, ``summary/trainable_params``, ``summary/frozen_params``,
    ``summary/param_bytes``, ``summary/buffer_bytes`` and ``summary/flops_per_step`` (or
    ``summary/flops_per_forward`` without a ``loss_fn``) at the first step, so every writer
    records them. Nothing runs for real (fake tensors). The result stays on the action as
    ``.summary`` (throughput and MFU need its FLOPs).

    Args:
        batch: one batch as the step gets it (its shapes and dtypes are used; it is moved to
            the state's device first).
        loss_fn: the train step's ``loss_fn``: FLOPs of the whole train step.
        depth: the table's module depth (see :func:`ftrain.summary`).
        print_table: print the table on rank 0.

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(4, 2), ftrain.optim.sgd(0.1))
        >>> run = Run(state=state)
        >>> Summarize(torch.ones(8, 4), print_table=False).start(run)
        >>> run.latest["summary/params"], run.latest["summary/flops_per_forward"]
        (10.0, 128.0)
    """

    order = -30  # before the other actions' start: the table is printed above the progress bar
    publishes = ("summary",)

    def __init__(self, batch: Any, loss_fn: Callable | None = None, *, depth: int = 1, print_table: bool = True):
        check_int(depth, "depth", who="Summarize")
        self.batch, self.loss_fn, self.depth, self.print_table = batch, loss_fn, depth, print_table
        self.summary: Summary | None = None

    def start(self, run: Run) -> None:
        batch = to_device(self.batch, tree.device_of(run.state))
        self.summary = summary(run.state, batch, self.loss_fn, depth=self.depth)
        if self.print_table and is_rank_zero():
            print(self.summary)
        run.publish("summary", self.summary.as_dict())


class Throughput(Periodic):
    """Publish ``train/samples_per_sec``, ``tokens_per_sec``, ``tflops``, ``mfu`` and peak memory.

    Rates are over the interval since it last fired, from the loop's clock (``fit``'s log sync
    makes them honest on an asynchronous device); no sync of its own. ``train/tflops`` is the
    model FLOP/s achieved (FLOPs per step times steps per second), ``train/mfu`` that over the
    peak; ``train/memory_gib`` is the peak memory allocated so far, where the device reports it
    (CUDA).

    Args:
        batch_size: samples per step.
        tokens_per_sample: tokens in one sample (a sequence length) for ``tokens_per_sec``.
        flops_per_step: FLOPs of one train step, or a :class:`Summarize` action whose summary
            has them (``fit(actions=[summarize, Throughput(..., flops_per_step=summarize)])``).
        peak_flops: the device's peak FLOP/s for ``mfu``; ``None``: :func:`ftrain.summary`'s
            ``peak_flops`` (a known GPU by name, else a measured matmul), measured once at start.
        every: the interval (default 50 steps, ``fit``'s default ``log_every``).

    Example:
        >>> run = Run(state=None, step=0)
        >>> meter = Throughput(batch_size=32, tokens_per_sample=128, flops_per_step=1e9, peak_flops=1e12, every=10)
        >>> meter.start(run)
        >>> for s in range(1, 11):  # a step every 0.5 s
        ...     run.step, run.time = s, run.time + 0.5
        ...     meter(run)
        >>> {k: round(v, 3) for k, v in run.new.items()}
        {'train/samples_per_sec': 64.0, 'train/tokens_per_sec': 8192.0, 'train/tflops': 0.002, 'train/mfu': 0.002}
    """

    order = -9  # right after LogMetrics, which syncs the device at the same steps
    publishes = ("train",)

    def __init__(
        self,
        batch_size: int,
        *,
        tokens_per_sample: int | None = None,
        flops_per_step: float | Summarize | None = None,
        peak_flops: float | None = None,
        every: Every | int | float = 50,
    ):
        super().__init__(None, every)
        self.batch_size = check_int(batch_size, "batch_size", who="Throughput")
        self.tokens_per_sample = None if tokens_per_sample is None else check_int(
            tokens_per_sample, "tokens_per_sample", who="Throughput"
        )  # fmt: skip
        if not (flops_per_step is None or isinstance(flops_per_step, Summarize)):
            check_number(flops_per_step, "flops_per_step", who="Throughput", low=0)
        if peak_flops is not None:
            check_number(peak_flops, "peak_flops", who="Throughput", low=0, open_low=True)
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self._since: tuple[int, float] | None = None

    def start(self, run: Run) -> None:
        super().start(run)
        self._since = None
        if self.flops_per_step is not None and self.peak_flops is None:
            self.peak_flops = peak_flops(tree.device_of(run.state) if run.state is not None else "cpu")

    def __call__(self, run: Run) -> None:
        if self._since is None:
            self._since = (run.step, run.time)  # the first step (compiling, warming up) is not a rate: start after it
            return
        super().__call__(run)

    def act(self, run: Run) -> None:
        steps, seconds = run.step - self._since[0], run.time - self._since[1]
        self._since = (run.step, run.time)
        if steps <= 0 or seconds <= 0:
            return
        rate = steps / seconds
        values = {"samples_per_sec": rate * self.batch_size}
        if self.tokens_per_sample is not None:
            values["tokens_per_sec"] = rate * self.batch_size * self.tokens_per_sample
        flops = self.flops_per_step
        if isinstance(flops, Summarize):
            flops = flops.summary.flops if flops.summary is not None else None
        if flops is not None:
            values["tflops"] = flops * rate / 1e12
            values["mfu"] = flops * rate / self.peak_flops
        device = tree.device_of(run.state) if run.state is not None else torch.device("cpu")
        if device.type == "cuda":
            values["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        run.publish("train", values)


class Histograms(Periodic):
    """Every ``every`` steps: a histogram of each param tensor, and if asked of its gradient, to ``write_histograms``.

    Off unless you add it (``fit(..., actions=[Histograms(every=500)])``). The counts are made on
    the device (``bins`` equal bins between each tensor's min and max) and all tensors' numbers
    come to the host in one copy: one sync per firing. Written as ``params/<name>``
    (:class:`ftrain.writers.Histogram`); writers without ``write_histograms`` skip them.

    **Gradients.** With ``loss_fn`` and ``batch`` it also writes ``grads/<name>``: the gradient of
    ``loss_fn`` on that one ``batch`` at the current params, recomputed eagerly when the action fires
    (one forward and backward outside the compiled step, with the step's key). The train step's
    own gradients live and die inside its compiled graph, so what this shows is not the gradient
    of the last training batch: it is the gradient of a fixed probe batch, comparable from one
    firing to the next, as the optimizer receives it (before clipping or Adam's scaling). Frozen
    params have none.

    Args:
        every: the interval (an int is steps).
        bins: bins per histogram.
        loss_fn: the train step's ``loss_fn``, for gradient histograms (with ``batch``).
        batch: the probe batch the gradients are taken on (moved to the state's device at the start).

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(3, 2), ftrain.optim.sgd(0.1))
        >>> h = param_histograms(state.params, bins=4)["params/weight"]
        >>> h.num, len(h.counts), sum(h.counts)
        (6, 4, 6.0)
    """

    order = -8

    def __init__(
        self, every: Every | int | float = 500, *, bins: int = 64, loss_fn: Callable | None = None, batch: Any = None
    ):
        super().__init__(None, every)
        self.bins = check_int(bins, "bins", who="Histograms")
        if (loss_fn is None) != (batch is None):
            raise ValueError(
                "Histograms: gradient histograms need both loss_fn= and batch= (the batch the gradient is taken on); "
                f"got loss_fn={loss_fn!r} and batch={'None' if batch is None else type(batch).__name__}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Histograms: loss_fn must be the train step's loss_fn, got {type(loss_fn).__name__}")
        self.loss_fn, self.batch = loss_fn, batch
        self._batch: Any = None  # the probe batch on the state's device

    def start(self, run: Run) -> None:
        super().start(run)
        if self.loss_fn is not None:
            self._batch = to_device(self.batch, tree.device_of(run.state))

    def act(self, run: Run) -> None:
        state = run.state
        tensors = {f"params/{name}": p for name, p in state.params.items()}
        if self.loss_fn is not None:
            grads, *_ = loss_and_grad(
                self.loss_fn, state.apply_fn, state.params, state.buffers, self._batch, step_key(state)
            )
            tensors.update({f"grads/{name}": g for name, g in grads.items()})
        run.writer.write_histograms(run.step, histograms(tensors, bins=self.bins))


def param_histograms(params: Mapping[str, torch.Tensor], *, bins: int = 64) -> dict[str, Histogram]:
    """``params/<name>`` -> :class:`ftrain.writers.Histogram` for each float tensor, counted on its device, one copy."""
    return histograms({f"params/{name}": p for name, p in params.items()}, bins=bins)


def histograms(tensors: Mapping[str, torch.Tensor], *, bins: int = 64) -> dict[str, Histogram]:
    """``name`` -> :class:`ftrain.writers.Histogram` for each float tensor, counted on its device, one copy for all.

    Example:
        >>> import torch
        >>> h = histograms({"w": torch.tensor([0.0, 0.25, 1.0])}, bins=2)["w"]
        >>> h.counts, h.edges
        ([2.0, 1.0], [0.0, 0.5, 1.0])
    """
    names, rows = [], []
    for name, p in tensors.items():
        if not (isinstance(p, torch.Tensor) and p.is_floating_point() and p.numel()):
            continue
        x = p.detach().reshape(-1).float()
        lo, hi = x.min(), x.max()
        width = torch.clamp((hi - lo) / bins, min=torch.finfo(torch.float32).tiny)
        index = ((x - lo) / width).long().clamp(0, bins - 1)  # the max falls in the last bin
        counts = torch.bincount(index, minlength=bins).float()
        stats = torch.stack([lo, hi, torch.tensor(float(x.numel()), device=x.device), x.sum(), x.square().sum(), width])
        names.append(name)
        rows.append(torch.cat([stats, counts]))
    if not rows:
        return {}
    host = torch.stack([r.to(rows[0].device) for r in rows]).tolist()  # the one sync
    out = {}
    for name, (lo, hi, num, total, squares, width, *counts) in zip(names, host):
        edges = [lo + i * width for i in range(bins + 1)]
        out[name] = Histogram(lo, hi, int(num), total, squares, edges, counts)
    return out
