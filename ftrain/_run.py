"""The :class:`Run` (what an action sees of the running loop, public as ``ftrain.actions.Run``) and
how a run stops on a signal: :class:`StopSignals` and :class:`Preempted`."""

from __future__ import annotations

import signal
import sys
import threading
import time as _time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .metrics import Accumulator
from .writers import MultiWriter, is_rank_zero

__all__ = ["INTERRUPTED", "Preempted", "Run", "StopSignals"]

INTERRUPTED = "interrupted"
"""``run.stop_reason`` after Ctrl-C (SIGINT, or a ``KeyboardInterrupt`` raised between steps)."""


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
        stop_reason: why the run stops, once an action has called :meth:`stop` (``"interrupted"``
            after Ctrl-C, ``"preempted by SIGTERM"`` after a preemption signal).
        signal: the signal that stopped the run (``signal.SIGINT`` for Ctrl-C), else None.
        actions: all the actions of this run (:class:`ftrain.actions.Action` objects), in the order they run.

    Example:
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
        self.signal: int | None = None
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
        """The metric groups the actions of this run publish (the union of their ``publishes``)."""
        return {group for action in self.actions for group in action.publishes}


class Preempted(SystemExit):
    """:func:`ftrain.fit` stopped on a preemption signal, after saving a checkpoint of the step it reached.

    A ``SystemExit`` with code ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1): left unhandled,
    the process exits the way a scheduler expects of a job that stopped on its signal, and running
    the same command again resumes from that checkpoint.

    Attributes:
        signal: the signal number.
        state: the state at the step ``fit`` stopped at (the one it saved).
        step: that step.

    Example:
        >>> import signal
        >>> e = Preempted(signal.SIGTERM, state=None, step=120)
        >>> isinstance(e, SystemExit), e.code
        (True, 143)
    """

    def __init__(self, signum: int, state: Any, step: int):
        super().__init__(128 + signum)
        self.signal, self.state, self.step = signum, state, step

    def __str__(self) -> str:
        return (
            f"ftrain.fit stopped on {signal.Signals(self.signal).name} at step {self.step}, after saving it "
            f"(exit code {self.code}); run the same command again to resume"
        )


class StopSignals:
    """While :func:`ftrain.fit` runs, Ctrl-C and the preemption signals only set a flag; the loop reads
    it at the next step boundary, so a step is never cut in half and nothing is saved inside a handler.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once. Handlers are installed in the main thread
    only (Python runs them there only), a signal that was ignored (``SIG_IGN``) stays ignored, and
    the previous handlers come back on exit.

    On several ranks (``torch.distributed`` with more than one process) every rank must stop at the
    same step (a sharded save is collective), but a signal reaches each at a different moment: each
    step boundary starts an all-reduce (max) of the flags on a gloo group of its own and reads the
    one started at the boundary before, so all ranks stop one step after the first saw the signal,
    and no boundary waits for the network.

    Example:
        >>> import signal
        >>> with StopSignals(preemption=[signal.SIGUSR1]) as stops:
        ...     signal.raise_signal(signal.SIGUSR1)
        ...     stops.stop_reason()
        ('preempted by SIGUSR1', <Signals.SIGUSR1: 10>)
    """

    def __init__(self, preemption: Iterable[int] = ()):
        self.preemption = tuple(preemption)
        self.interrupted = False
        self.forced = False  # a second Ctrl-C: stop now
        self.preempted: int | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            wanted = {signal.SIGINT: self._on_interrupt, **dict.fromkeys(self.preemption, self._on_preemption)}
            for signum, handler in wanted.items():
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, handler)
        self._group = _flag_group()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if exc[0] is None and self._pending is not None:
            self._pending[0].wait()  # (not after an error: a peer may be gone)
        self._pending = None

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            self.forced = True
            raise KeyboardInterrupt
        self.interrupted = True

    def _on_preemption(self, signum: int, frame: Any) -> None:
        if self.preempted is None:
            self.preempted = signum

    def stop_reason(self) -> tuple[str, signal.Signals] | None:
        """At a step boundary: ``(reason, signal)`` when the run stops here, else None."""
        interrupted, preempted = self._agree() if self._group is not None else (self.interrupted, self.preempted)
        if preempted:
            return f"preempted by {signal.Signals(preempted).name}", signal.Signals(preempted)
        if interrupted:
            return INTERRUPTED, signal.SIGINT
        return None

    def _agree(self) -> tuple[bool, int | None]:
        """Every rank's flags as of the boundary before (their max); this boundary's are sent off."""
        agreed: tuple[bool, int | None] = (False, None)
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            agreed = (bool(flags[0]), int(flags[1]) or None)
        flags = torch.tensor([int(self.interrupted), self.preempted or 0], dtype=torch.int32)
        work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flags)
        return agreed


_FLAG_GROUP: list[Any] = [None, None]  # (the default process group, the flags' gloo group beside it)


def _flag_group() -> Any:
    """A gloo group for the flags (a job on any backend can have one), or None on one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _FLAG_GROUP[0] is not dist.group.WORLD:  # made collectively, in every rank's first fit
        _FLAG_GROUP[:] = [dist.group.WORLD, dist.new_group(backend="gloo")]
    return _FLAG_GROUP[1]


def announce(message: str) -> None:
    """One line on stderr from rank 0: what the person at the terminal needs to know now."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)
