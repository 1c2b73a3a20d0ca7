"""Metrics accumulated on their device, read on the host only when asked.

A step returns its metrics as 0-d tensors that still live on the device. Turning
one into a Python float (``float(t)``, ``t.item()``) waits for the device to
finish: a host sync. Doing that every step stalls an accelerator's queue, so
:class:`Accumulator` keeps the values *on the device*, reduces them there, and
:meth:`Accumulator.compute` copies all of them to the host in one transfer, when
a log line or an action needs the numbers. Per step it only keeps references
(no device op at all), which keeps the loop's overhead near zero on fast steps.

Reductions: ``"mean"`` (optionally weighted, e.g. by batch size), ``"sum"``,
``"last"``, ``"max"`` and ``"min"``. Accuracy is a mean: have the loss function
return :func:`accuracy` (the fraction correct in the batch) and let the
accumulator average it; :func:`ftrain.evaluate` weights every batch by its size,
so a smaller last batch is counted exactly.

Example:
    >>> import torch
    >>> from ftrain import metrics
    >>> acc = metrics.Accumulator({"lr": "last"})
    >>> acc.update({"loss": torch.tensor(2.0), "lr": torch.tensor(0.1)})
    >>> acc.update({"loss": torch.tensor(4.0), "lr": torch.tensor(0.2)})
    >>> {k: round(v, 3) for k, v in acc.compute().items()}
    {'loss': 3.0, 'lr': 0.2}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

__all__ = ["REDUCTIONS", "Accumulator", "Reduction", "accuracy"]

Reduction = Literal["mean", "sum", "last", "max", "min"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "last", "max", "min")
"""The reductions an :class:`Accumulator` knows."""


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of rows of ``logits`` whose arg-max is ``labels``, as a 0-d float tensor.

    Computed on the device (no sync): return it from a loss function as a metric.

    Args:
        logits: ``(batch, classes)`` scores (or ``(..., classes)``).
        labels: integer class indices of shape ``logits.shape[:-1]``.

    Example:
        >>> import torch
        >>> float(accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])))
        0.5
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"accuracy: labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}; pass class indices, not one-hot targets"
        )
    return (logits.argmax(-1) == labels).float().mean()


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 sums where the device has them (CPU, CUDA); MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


_FOLD_EVERY = 256  # pending values per metric before they are reduced on the device (bounds memory)


class Accumulator:
    """Running reductions of a stream of metric dicts, kept on the metrics' device.

    :meth:`update` only keeps references to the step's 0-d tensors (no device
    op, no host sync: well under a microsecond per metric); they are reduced on
    the device in one stacked op every 256 updates and at :meth:`compute`, which
    is the single host sync.

    Args:
        reductions: the reduction per metric name (``"mean"``, ``"sum"``,
            ``"last"``, ``"max"``, ``"min"``); names not listed use ``default``.
        default: the reduction for unlisted names.

    Example:
        >>> import torch
        >>> acc = Accumulator({"seen": "sum"})
        >>> acc.update({"loss": torch.tensor(1.0), "seen": torch.tensor(32)}, weight=32)
        >>> acc.update({"loss": torch.tensor(4.0), "seen": torch.tensor(16)}, weight=16)
        >>> acc.compute()
        {'loss': 2.0, 'seen': 48.0}
    """

    def __init__(self, reductions: Mapping[str, str] | None = None, default: str = "mean"):
        reductions = dict(reductions or {})
        for name, how in [*reductions.items(), ("default", default)]:
            if how not in REDUCTIONS:
                raise ValueError(f"Accumulator: unknown reduction {how!r} for {name!r}; choose one of {REDUCTIONS}")
        self.reductions = reductions
        self.default = default
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._pending: dict[str, list[torch.Tensor]] = {}  # values not yet folded in
        self._pending_weights: dict[str, list[float]] = {}
        self._folded: dict[str, torch.Tensor] = {}  # the reduction of the values folded so far
        self._weight: dict[str, float] = {}  # total weight, for "mean"
        self.count = 0
        """The number of :meth:`update` calls since the last reset."""

    def __len__(self) -> int:
        return self.count

    @property
    def names(self) -> list[str]:
        """The metric names seen since the last reset."""
        return list(self._pending)

    def update(self, metrics: Mapping[str, torch.Tensor | float], weight: float = 1.0) -> None:
        """Fold one step's metrics in (no host sync, no device op).

        Args:
            metrics: name -> 0-d tensor (or Python number).
            weight: how much this update counts in a ``"mean"`` (e.g. the batch size).
        """
        self.count += 1
        pending, weights = self._pending, self._pending_weights
        for name, value in metrics.items():
            values = pending.get(name)
            if not isinstance(value, torch.Tensor):
                value = self._as_tensor(name, value)
            if values is None:
                values = self._first(name, value)
            values.append(value)
            weights[name].append(weight)
            if len(values) >= _FOLD_EVERY:
                self._fold(name)

    @staticmethod
    def _as_tensor(name: str, value: object) -> torch.Tensor:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"metric {name!r} must be a 0-d tensor or a number, got {type(value).__name__}; "
                "return scalars from the loss function (e.g. loss.detach(), accuracy(logits, y))"
            )
        return torch.tensor(value, dtype=torch.float64)

    def _first(self, name: str, value: torch.Tensor) -> list[torch.Tensor]:
        # Validate once per name (shape is host metadata: no sync), so the per-step path stays lean.
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}; "
                "reduce it in the loss function (e.g. .mean())"
            )
        self._pending_weights[name] = []
        self._pending[name] = values = []
        return values

    def _fold(self, name: str) -> None:
        """Reduce the pending values of ``name`` on the device (one stack and one reduction)."""
        values, weights = self._pending[name], self._pending_weights[name]
        if not values:
            return
        how = self.reductions.get(name, self.default)
        device = values[-1].device
        dtype = _accumulator_dtype(device)
        if how == "last":
            folded = values[-1].detach().reshape(()).to(dtype)
        else:
            try:  # the common case: same shape, dtype and device every step: one op
                stacked = torch.stack(values).detach().reshape(-1).to(dtype)
            except RuntimeError:
                stacked = torch.stack([v.detach().reshape(()).to(device=device, dtype=dtype) for v in values])
            if how == "mean":
                if weights.count(1.0) != len(weights):
                    stacked = stacked * torch.tensor(weights, dtype=dtype, device=device)
                self._weight[name] = self._weight.get(name, 0.0) + sum(weights)
                folded = stacked.sum()
            elif how == "sum":
                folded = stacked.sum()
            elif how == "max":
                folded = stacked.max()
            else:
                folded = stacked.min()
            prev = self._folded.get(name)
            if prev is not None:
                if how in ("mean", "sum"):
                    folded = prev + folded
                elif how == "max":
                    folded = torch.maximum(prev, folded)
                else:
                    folded = torch.minimum(prev, folded)
        self._folded[name] = folded
        values.clear()
        weights.clear()

    def compute(self) -> dict[str, float]:
        """The reduced values as Python floats: one device-to-host transfer per device.

        Returns an empty dict when nothing was accumulated.
        """
        names = [name for name in self._pending if self._pending[name] or name in self._folded]
        if not names:
            return {}
        for name in names:
            self._fold(name)
        by_device: dict[torch.device, list[int]] = {}
        for i, name in enumerate(names):
            by_device.setdefault(self._folded[name].device, []).append(i)
        host: list[float] = [0.0] * len(names)
        for idx in by_device.values():
            # This is the host sync: one stacked copy instead of one .item() per metric.
            stacked = torch.stack([self._folded[names[i]] for i in idx]).tolist()
            for i, v in zip(idx, stacked):
                host[i] = v
        out = {}
        for name, v in zip(names, host):
            if self.reductions.get(name, self.default) == "mean":
                v = v / self._weight[name]
            out[name] = float(v)
        return out
