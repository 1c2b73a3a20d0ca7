"""Mixed precision for pure steps: an autocast policy and a dynamic loss scale held as state.

The params stay float32 (the "master" copy) and the optimizer runs in float32; only the forward
and backward run under ``torch.autocast`` in the policy's compute dtype. bfloat16 has float32's
range and needs no loss scaling. float16 does: small gradients underflow to zero, so the loss is
multiplied by a scale before the backward and the gradients divided by it after. The scale
adapts as in jmp / flax's ``DynamicScale``: a step whose gradients are not finite is skipped
(params, optimizer state and buffers stay as they were) and the scale backs off; after
``growth_interval`` finite steps in a row it grows. The scale is a :class:`DynamicScale` in the
state's ``loss_scale`` field, so checkpoints carry it and a resumed run continues exactly.

Example:
    >>> import torch, ftrain
    >>> from ftrain import precision
    >>> state = precision.ScaledTrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
    >>> float(state.loss_scale.scale)
    32768.0
    >>> policy = precision.Policy.from_name("fp16")
    >>> policy.compute_dtype, policy.loss_scaling
    (torch.float16, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import torch

from . import tree
from ._state import TrainState
from ._validate import check_int, check_number, check_one_of

__all__ = ["DynamicScale", "Policy", "ScaledTrainState", "all_finite", "select"]

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class DynamicScale(NamedTuple):
    """The loss scale's state: ``scale`` (0-d float32) and ``good_steps`` (0-d int64).

    ``good_steps`` counts finite steps since the scale last changed. The tuning knobs live in
    :class:`Policy` (configuration, not state).

    Example:
        >>> s = DynamicScale.create(1024.0)
        >>> float(s.scale), int(s.good_steps)
        (1024.0, 0)
    """

    scale: torch.Tensor
    good_steps: torch.Tensor

    @staticmethod
    def create(init_scale: float = 2.0**15, device: torch.device | str | None = None) -> DynamicScale:
        """A fresh scale (default ``2**15``, as torch's ``GradScaler``)."""
        check_number(init_scale, "init_scale", who="DynamicScale.create", low=0, open_low=True)
        return DynamicScale(
            torch.tensor(float(init_scale), dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a step computes: autocast dtype, and whether float16 loss scaling is used.

    Args:
        compute_dtype: ``torch.bfloat16`` or ``torch.float16`` to autocast the forward and
            backward; ``None`` (or float32) runs in full precision.
        loss_scaling: scale the loss dynamically (default: on for float16 only). Needs a state
            with a ``loss_scale`` field (:class:`ScaledTrainState`, or your subclass with one).
        growth_interval: finite steps in a row before the scale grows.
        growth_factor / backoff_factor: multiply the scale by these on growth / on overflow.
        min_scale: the scale never backs off below this.

    Example:
        >>> Policy.from_name("bf16")
        Policy(compute_dtype=torch.bfloat16, loss_scaling=False, growth_interval=2000, growth_factor=2.0, backoff_factor=0.5, min_scale=1.0)
    """

    compute_dtype: torch.dtype | None = None
    loss_scaling: bool | None = None
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        dtype = None if self.compute_dtype == torch.float32 else self.compute_dtype
        check_one_of(dtype, "compute_dtype", (torch.bfloat16, torch.float16, None), who="Policy")
        object.__setattr__(self, "compute_dtype", dtype)
        if self.loss_scaling is None:
            object.__setattr__(self, "loss_scaling", dtype == torch.float16)
        check_int(self.growth_interval, "growth_interval", who="Policy")
        check_number(self.growth_factor, "growth_factor", who="Policy", low=1, open_low=True)
        check_number(self.backoff_factor, "backoff_factor", who="Policy", low=0, high=1, open_low=True, open_high=True)

    @staticmethod
    def from_name(name: str) -> Policy:
        """``"fp32"``, ``"bf16"`` or ``"fp16"`` (float16 turns loss scaling on)."""
        if name not in _NAMES:
            raise ValueError(f"unknown precision {name!r}; use one of 'fp32', 'bf16', 'fp16' or a precision.Policy")
        return Policy(compute_dtype=_NAMES[name])

    @staticmethod
    def coerce(policy: Policy | str | None) -> Policy:
        """A :class:`Policy` from a policy, a name, or ``None`` (full precision)."""
        if policy is None:
            return Policy()
        if isinstance(policy, str):
            return Policy.from_name(policy)
        if isinstance(policy, Policy):
            return policy
        raise TypeError(f"precision must be a precision.Policy, 'fp32', 'bf16', 'fp16' or None, got {policy!r}")

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The autocast context for the forward (a no-op in full precision)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def adjust(self, scale: DynamicScale, finite: torch.Tensor) -> DynamicScale:
        """The next loss scale after a step whose gradients were ``finite`` (a 0-d bool tensor).

        Pure and traceable: no host sync.
        """
        grown = scale.good_steps + 1 >= self.growth_interval
        up = torch.where(grown, scale.scale * self.growth_factor, scale.scale)
        down = torch.clamp(scale.scale * self.backoff_factor, min=self.min_scale)
        new_scale = torch.where(finite, up, down)
        good = torch.where(finite & ~grown, scale.good_steps + 1, torch.zeros_like(scale.good_steps))
        return DynamicScale(new_scale, good)


# The skip-on-overflow step's two tree operations; they live in ftrain.tree (names kept here).
all_finite = tree.all_finite
select = tree.where


@dataclasses.dataclass(frozen=True, eq=False)
class ScaledTrainState(TrainState):
    """A :class:`~ftrain.TrainState` with a ``loss_scale`` field, for float16 training.

    Example:
        >>> import torch, ftrain
        >>> s = ScaledTrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity(),
        ...                             loss_scale=DynamicScale.create(256.0))
        >>> float(s.loss_scale.scale)
        256.0
    """

    loss_scale: DynamicScale = dataclasses.field(default_factory=DynamicScale.create)
