"""Schedules: functions of the step count (a 0-d int64 tensor) returning a 0-d float64 tensor.

A schedule is pure tensor arithmetic (no Python branch on the step), so an optimizer that
evaluates one inside a compiled step compiles once: the step count is a tensor in the
optimizer state, never a Python int. Values are float64 so they match
``torch.optim.lr_scheduler`` step for step; optimizers cast them to each parameter's dtype.
Any ``learning_rate`` in :mod:`ftrain.optim` accepts a float or a schedule.

Example:
    >>> import torch
    >>> from ftrain import optim, schedules
    >>> lr = schedules.warmup_cosine_decay(0.0, peak_value=3e-4, warmup_steps=100, decay_steps=1000)
    >>> float(lr(torch.tensor(100)))
    0.0003
    >>> tx = optim.adamw(lr, weight_decay=0.05)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ._validate import check_number
from .optim import Schedule

__all__ = [
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "join",
    "linear",
    "one_cycle",
    "piecewise_constant",
    "warmup_cosine_decay",
]

_DTYPE = torch.float64


def _steps(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count).to(_DTYPE)


def _check_steps(owner: str, name: str, value: int, *, allow_zero: bool = False) -> None:
    # Not _validate.check_int: its wording for low=1 is "a positive int", and this module's
    # messages (pinned by its tests) say "an int >= 1" beside "an int >= 0".
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        need = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"schedules.{owner}: {name} must be an int {need}, got {value!r}")


def _check_number(owner: str, name: str, value: float) -> None:
    check_number(value, name, who=f"schedules.{owner}")


def constant(value: float) -> Schedule:
    """Always ``value`` (``torch.optim.lr_scheduler.ConstantLR(factor=1)``).

    >>> float(constant(0.1)(torch.tensor(7)))
    0.1
    """
    _check_number("constant", "value", value)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_steps(count)) + value

    return schedule


def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, starting at ``transition_begin``::

        v(t) = init + (end - init) * clip((t - transition_begin) / transition_steps, 0, 1)

    ``torch.optim.lr_scheduler.LinearLR(start_factor, end_factor, total_iters)`` is
    ``linear(lr * start_factor, lr * end_factor, total_iters)``.

    >>> [round(float(linear(1.0, 0.0, 4)(torch.tensor(t))), 2) for t in range(6)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    _check_number("linear", "init_value", init_value)
    _check_number("linear", "end_value", end_value)
    _check_steps("linear", "transition_steps", transition_steps)
    _check_steps("linear", "transition_begin", transition_begin, allow_zero=True)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp((_steps(count) - transition_begin) / transition_steps, 0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``, then flat::

        c(t) = (0.5 * (1 + cos(pi * min(t, decay_steps) / decay_steps))) ** exponent
        v(t) = init_value * ((1 - alpha) * c(t) + alpha)

    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max, eta_min)`` for ``t <= T_max`` is
    ``cosine_decay(lr, T_max, alpha=eta_min / lr)``.

    >>> float(cosine_decay(1.0, 10)(torch.tensor(5)))
    0.5
    """
    _check_number("cosine_decay", "init_value", init_value)
    _check_steps("cosine_decay", "decay_steps", decay_steps)
    _check_number("cosine_decay", "alpha", alpha)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_steps(count), max=decay_steps)
        c = (0.5 * (1.0 + torch.cos(math.pi * t / decay_steps))) ** exponent
        return init_value * ((1.0 - alpha) * c + alpha)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on; each one restarts its count at 0 there.

    >>> s = join([constant(1.0), linear(1.0, 0.0, 2)], [3])
    >>> [float(s(torch.tensor(t))) for t in range(6)]
    [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"schedules.join: needs one boundary between each pair of schedules; got {len(schedules)} schedules "
            f"and {len(boundaries)} boundaries"
        )
    for i, b in enumerate(boundaries):
        _check_steps("join", f"boundaries[{i}]", b, allow_zero=True)
    if boundaries != sorted(boundaries):
        raise ValueError(f"schedules.join: boundaries must be increasing, got {boundaries}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        count = torch.as_tensor(count)
        out = torch.as_tensor(schedules[0](count)).to(_DTYPE)
        for b, s in zip(boundaries, schedules[1:]):
            out = torch.where(count < b, out, torch.as_tensor(s(count - b)).to(_DTYPE))
        return out

    return schedule


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value``; ``decay_steps`` is the *total* length, warmup included (as optax).

    >>> s = warmup_cosine_decay(0.0, 1.0, warmup_steps=2, decay_steps=6)
    >>> [round(float(s(torch.tensor(t))), 3) for t in range(7)]
    [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    _check_number("warmup_cosine_decay", "peak_value", peak_value)
    _check_steps("warmup_cosine_decay", "warmup_steps", warmup_steps, allow_zero=True)
    _check_steps("warmup_cosine_decay", "decay_steps", decay_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"schedules.warmup_cosine_decay: decay_steps ({decay_steps}) is the total length including warmup, "
            f"so it must exceed warmup_steps ({warmup_steps})"
        )
    alpha = end_value / peak_value if peak_value else 0.0
    decay = cosine_decay(peak_value, decay_steps - warmup_steps, alpha=alpha, exponent=exponent)
    if warmup_steps == 0:
        return decay
    return join([linear(init_value, peak_value, warmup_steps), decay], [warmup_steps])


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init_value * decay_rate ** ((t - transition_begin) / transition_steps)`` (exponent floored
    with ``staircase``, clipped at 0 before ``transition_begin``; bounded by ``end_value`` if given).

    ``torch.optim.lr_scheduler.ExponentialLR(gamma)`` is ``exponential_decay(lr, 1, gamma)``;
    ``StepLR(step_size, gamma)`` is ``exponential_decay(lr, step_size, gamma, staircase=True)``.

    >>> [float(exponential_decay(1.0, 2, 0.5, staircase=True)(torch.tensor(t))) for t in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    _check_number("exponential_decay", "init_value", init_value)
    _check_steps("exponential_decay", "transition_steps", transition_steps)
    _check_number("exponential_decay", "decay_rate", decay_rate)
    _check_steps("exponential_decay", "transition_begin", transition_begin, allow_zero=True)
    if decay_rate <= 0:
        raise ValueError(f"schedules.exponential_decay: decay_rate must be > 0, got {decay_rate!r}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        p = torch.clamp(_steps(count) - transition_begin, min=0.0) / transition_steps
        if staircase:
            p = torch.floor(p)
        value = init_value * decay_rate**p
        if end_value is not None:
            value = torch.clamp(value, min=end_value) if decay_rate < 1 else torch.clamp(value, max=end_value)
        return value

    return schedule


def piecewise_constant(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """``init_value``, multiplied by ``scale`` from each ``boundary`` step on.

    ``torch.optim.lr_scheduler.MultiStepLR(milestones, gamma)`` is
    ``piecewise_constant(lr, {m: gamma for m in milestones})``.

    >>> s = piecewise_constant(1.0, {2: 0.1, 4: 0.1})
    >>> [round(float(s(torch.tensor(t))), 4) for t in range(6)]
    [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    _check_number("piecewise_constant", "init_value", init_value)
    items = sorted((boundaries_and_scales or {}).items())
    for b, s in items:
        _check_steps("piecewise_constant", "boundary", b, allow_zero=True)
        _check_number("piecewise_constant", f"scale at boundary {b}", s)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(count)
        value = torch.zeros_like(t, dtype=_DTYPE) + init_value
        for b, s in items:
            value = torch.where(t >= b, value * s, value)
        return value

    return schedule


def one_cycle(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """The one-cycle policy with cosine annealing, as ``torch.optim.lr_scheduler.OneCycleLR(
    max_lr=peak_value, total_steps=transition_steps, pct_start, div_factor, final_div_factor)``.

    From ``peak / div_factor`` up to ``peak`` by step ``pct_start * transition_steps - 1``, then
    down to ``peak / div_factor / final_div_factor`` at step ``transition_steps - 1`` (and flat
    after). Each phase is ``end + (start - end) / 2 * (1 + cos(pi * pct))``.

    >>> s = one_cycle(10, 1.0, pct_start=0.3)
    >>> round(float(s(torch.tensor(2))), 6), round(float(s(torch.tensor(9))), 9)
    (1.0, 4e-06)
    """
    _check_steps("one_cycle", "transition_steps", transition_steps)
    _check_number("one_cycle", "peak_value", peak_value)
    check_number(pct_start, "pct_start", who="schedules.one_cycle", low=0, high=1, open_low=True, open_high=True)
    initial = peak_value / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * transition_steps) - 1.0
    down_end = float(transition_steps - 1)
    if up_end <= 0 or down_end <= up_end:
        raise ValueError(
            f"schedules.one_cycle: pct_start * transition_steps ({pct_start} * {transition_steps}) must be > 1 "
            "and leave at least one step to anneal down"
        )

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1.0)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = _steps(count)
        up = anneal(initial, peak_value, torch.clamp(t / up_end, 0.0, 1.0))
        down = anneal(peak_value, final, torch.clamp((t - up_end) / (down_end - up_end), 0.0, 1.0))
        return torch.where(t <= up_end, up, down)

    return schedule
