"""The :class:`Run`: what an action sees of the running loop (public as ``ftrain.actions.Run``)."""

from __future__ import annotations

import time as _time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .metrics import Accumulator
from .writers import MultiWriter

__all__ = ["Run"]


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
