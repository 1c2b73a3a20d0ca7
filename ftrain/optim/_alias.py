"""Named optimizers: each is only a :func:`chain` of building blocks, no new math.

Argument names follow optax (``learning_rate``, ``b1``, ``b2``, ``eps``, ``weight_decay``,
``momentum``, ``nesterov``, ``mask``); defaults and numbers follow the matching ``torch.optim``
class, so a float64 run equals torch's to rounding. ``learning_rate`` accepts a float or a
schedule (a function of the step count, see :mod:`ftrain.schedules`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._base import GradientTransformation, Scalar, ScalarOrSchedule, chain, check_hyperparam, is_tensor_hyperparam
from ._fused import FusedApply, adam_apply, sgd_apply
from ._transform import (
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rss,
    trace,
)

__all__ = ["adagrad", "adam", "adamw", "lion", "nadam", "radam", "rmsprop", "sgd"]


def _is_zero(value: Any) -> bool:
    # A tensor (an injected hyperparameter) always keeps its block: its value may change later,
    # and the optimizer's structure must not depend on a value that lives on the device.
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return False
    return value == 0


def _named(
    owner: str,
    learning_rate: ScalarOrSchedule,
    *core: GradientTransformation | None,
    weight_decay: Scalar = 0.0,
    decoupled: bool = False,
    mask: Any = None,
    maximize: bool = False,
    fused: Callable[..., FusedApply] | None = None,
    scalars: tuple = (),
) -> GradientTransformation:
    """The chain every named optimizer is: ``[scale(-1)], [L2 decay], *core, [decoupled decay], lr``.

    torch.optim negates the gradient first (``maximize``), then adds L2 weight decay; decoupled
    (AdamW-style) decay comes after the adaptive blocks, right before the learning rate.
    ``None`` entries of ``core`` are left out.

    ``fused(index=..., size=...)`` builds the chain's eager ``fused_apply`` (see ``optim._fused``),
    given where the first core block's state sits in the chain's state (``None``: no core block)
    and how many blocks the chain has. It
    is left out when a hyperparameter (the learning rate, weight decay, ``scalars``) is a
    tensor or a ``mask`` limits the decay: the chain alone serves those.
    """
    check_hyperparam(owner, "learning_rate", learning_rate)
    decay = None if _is_zero(weight_decay) else add_decayed_weights(weight_decay, mask)
    blocks = (
        scale(-1.0) if maximize else None,
        None if decoupled else decay,
        *core,
        decay if decoupled else None,
        scale_by_learning_rate(learning_rate),
    )
    kept = [t for t in blocks if t is not None]
    tx = chain(*kept)
    if fused is None or mask is not None or any(map(is_tensor_hyperparam, (learning_rate, weight_decay, *scalars))):
        return tx
    index = next((i for i, t in enumerate(kept) if core and t is core[0]), None)
    return tx._replace(fused_apply=fused(index=index, size=len(kept)))


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: Scalar | None = None,
    nesterov: bool = False,
    *,
    weight_decay: Scalar = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD(lr, momentum, nesterov=, weight_decay=, maximize=)``.

    Update rule (``g`` the gradient, ``b`` the momentum buffer, starting at 0)::

        g <- -g                           if maximize
        g <- g + weight_decay * p
        b <- momentum * b + g;  g <- b    (or g + momentum * b if nesterov)
        p <- p - learning_rate * g

    Chain: ``[scale(-1)], [add_decayed_weights], [trace], scale_by_learning_rate``.
    (torch's ``dampening`` is not offered: it is 0 here.)

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.sgd(0.1, momentum=0.9)
    >>> p = {"w": torch.ones(2)}
    >>> u, s = tx.update({"w": torch.ones(2)}, tx.init(p), p)
    >>> optim.apply_updates(p, u)["w"]
    tensor([0.9000, 0.9000])
    """
    if nesterov and _is_zero(momentum):
        raise ValueError("sgd: nesterov=True needs a momentum > 0 (as in torch.optim.SGD)")
    momentum_block = None if _is_zero(momentum) else trace(momentum, nesterov)
    fused = functools.partial(
        sgd_apply, learning_rate, 0.0 if momentum is None else momentum, nesterov, weight_decay=weight_decay,
        maximize=maximize,
    )  # fmt: skip
    return _named(
        "sgd", learning_rate, momentum_block, weight_decay=weight_decay, maximize=maximize, fused=fused,
        scalars=(momentum,),
    )  # fmt: skip


def adam(
    learning_rate: ScalarOrSchedule, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
    *, weight_decay: Scalar = 0.0, amsgrad: bool = False, maximize: bool = False,
) -> GradientTransformation:  # fmt: skip
    """Adam, as ``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay, amsgrad, maximize)``.

    Update rule (``t`` the 1-based step)::

        g <- -g if maximize;  g <- g + weight_decay * p      (L2, coupled, as torch.optim.Adam)
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  (amsgrad: v_max <- max(v_max, v))
        p <- p - learning_rate * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Chain: ``[scale(-1)], [add_decayed_weights], scale_by_adam, scale_by_learning_rate``.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.adam(0.1)
    >>> p = {"w": torch.zeros(2)}
    >>> u, _ = tx.update({"w": torch.tensor([1.0, -1.0])}, tx.init(p), p)
    >>> u["w"]
    tensor([-0.1000,  0.1000])
    """
    return _adam("adam", learning_rate, b1, b2, eps, weight_decay, False, None, amsgrad, maximize)


def adamw(
    learning_rate: ScalarOrSchedule, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2, *, mask: Any = None, amsgrad: bool = False, maximize: bool = False,
) -> GradientTransformation:  # fmt: skip
    """AdamW, as ``torch.optim.AdamW(lr, betas=(b1, b2), eps, weight_decay, amsgrad, maximize)``.

    Decoupled weight decay (torch applies ``p *= 1 - lr * wd`` before the Adam step; the sum is
    the same)::

        g <- -g if maximize
        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - learning_rate * ((m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps) + weight_decay * p)

    ``mask`` (bool tree or function of the params) limits the decay, e.g. to weight matrices.
    Default ``weight_decay`` is torch's 0.01. Chain: ``[scale(-1)], scale_by_adam,
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate``.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.adamw(0.1, weight_decay=0.5)
    >>> p = {"w": torch.ones(1)}
    >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
    >>> optim.apply_updates(p, u)["w"]     # 1 - 0.1 * (1 + 0.5 * 1)
    tensor([0.8500])
    """
    return _adam("adamw", learning_rate, b1, b2, eps, weight_decay, True, mask, amsgrad, maximize)


def _adam(
    owner: str, learning_rate: ScalarOrSchedule, b1: Scalar, b2: Scalar, eps: Scalar, weight_decay: Scalar,
    decoupled: bool, mask: Any, amsgrad: bool, maximize: bool,
) -> GradientTransformation:  # fmt: skip
    """Adam's chain (``decoupled``: AdamW's), with its fused eager apply."""
    fused = functools.partial(
        adam_apply, learning_rate, b1, b2, eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
        maximize=maximize,
    )  # fmt: skip
    return _named(
        owner, learning_rate, scale_by_adam(b1, b2, eps, amsgrad=amsgrad), weight_decay=weight_decay,
        decoupled=decoupled, mask=mask, maximize=maximize, fused=fused, scalars=(b1, b2, eps),
    )  # fmt: skip


def nadam(
    learning_rate: ScalarOrSchedule, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
    *, weight_decay: Scalar = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:  # fmt: skip
    """NAdam, as ``torch.optim.NAdam(lr, betas=(b1, b2), eps, weight_decay, momentum_decay,
    decoupled_weight_decay, maximize)``. The rule is in :func:`scale_by_nadam`; weight decay is
    L2 (added to the gradient first) or, with ``decoupled_weight_decay``, AdamW-style.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.nadam(1e-3)
    >>> p = {"w": torch.zeros(1)}
    >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init(p), p)
    >>> bool(u["w"] < 0)
    True
    """
    adaptive = scale_by_nadam(b1, b2, eps, momentum_decay=momentum_decay)
    return _named(
        "nadam", learning_rate, adaptive, weight_decay=weight_decay, decoupled=decoupled_weight_decay, maximize=maximize
    )


def radam(
    learning_rate: ScalarOrSchedule, b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
    *, weight_decay: Scalar = 0.0, decoupled_weight_decay: bool = False, maximize: bool = False,
) -> GradientTransformation:  # fmt: skip
    """RAdam, as ``torch.optim.RAdam(lr, betas=(b1, b2), eps, weight_decay, decoupled_weight_decay,
    maximize)``. The rule is in :func:`scale_by_radam`.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.radam(0.1)
    >>> p = {"w": torch.zeros(1)}
    >>> tx.update({"w": torch.ones(1)}, tx.init(p), p)[0]["w"]   # un-rectified first steps: -lr * m_hat
    tensor([-0.1000])
    """
    adaptive = scale_by_radam(b1, b2, eps)
    return _named(
        "radam", learning_rate, adaptive, weight_decay=weight_decay, decoupled=decoupled_weight_decay, maximize=maximize
    )


def rmsprop(
    learning_rate: ScalarOrSchedule, decay: Scalar = 0.99, eps: Scalar = 1e-8,
    *, momentum: Scalar | None = None, centered: bool = False, weight_decay: Scalar = 0.0, maximize: bool = False,
) -> GradientTransformation:  # fmt: skip
    """RMSprop, as ``torch.optim.RMSprop(lr, alpha=decay, eps, weight_decay, momentum, centered,
    maximize)``::

        g <- -g if maximize;  g <- g + weight_decay * p
        v <- decay v + (1 - decay) g^2;   (centered: a <- decay a + (1 - decay) g; v~ = v - a^2)
        d = g / (sqrt(v or v~) + eps)
        b <- momentum b + d;  d <- b      (if momentum)
        p <- p - learning_rate * d

    Chain: ``[scale(-1)], [add_decayed_weights], scale_by_rms, [trace], scale_by_learning_rate``.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.rmsprop(0.01, decay=0.0)
    >>> p = {"w": torch.zeros(1)}
    >>> tx.update({"w": torch.tensor([4.0])}, tx.init(p), p)[0]["w"]
    tensor([-0.0100])
    """
    adaptive = scale_by_rms(decay, eps, centered=centered)
    momentum_block = None if _is_zero(momentum) else trace(momentum)
    return _named("rmsprop", learning_rate, adaptive, momentum_block, weight_decay=weight_decay, maximize=maximize)


def adagrad(
    learning_rate: ScalarOrSchedule, lr_decay: Scalar = 0.0, weight_decay: Scalar = 0.0,
    initial_accumulator_value: float = 0.0, eps: Scalar = 1e-10, *, maximize: bool = False,
) -> GradientTransformation:  # fmt: skip
    """Adagrad, as ``torch.optim.Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value,
    eps, maximize)`` (same argument order)::

        g <- -g if maximize;  g <- g + weight_decay * p
        s <- s + g^2                                      (s starts at initial_accumulator_value)
        p <- p - learning_rate / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)

    Chain: ``[scale(-1)], [add_decayed_weights], scale_by_rss, scale_by_learning_rate`` (with
    ``lr_decay`` the learning rate becomes a schedule of the step).

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.adagrad(0.5)
    >>> p = {"w": torch.zeros(1)}
    >>> tx.update({"w": torch.tensor([3.0])}, tx.init(p), p)[0]["w"]
    tensor([-0.5000])
    """
    check_hyperparam("adagrad", "learning_rate", learning_rate)
    check_hyperparam("adagrad", "lr_decay", lr_decay)
    lr: ScalarOrSchedule = learning_rate
    if not _is_zero(lr_decay):
        base = learning_rate

        def lr(count: torch.Tensor) -> torch.Tensor:
            value = base(count) if callable(base) else base
            return value / (1.0 + count.to(torch.float64) * lr_decay)

    adaptive = scale_by_rss(initial_accumulator_value, eps)
    return _named("adagrad", lr, adaptive, weight_decay=weight_decay, maximize=maximize)


def lion(
    learning_rate: ScalarOrSchedule, b1: Scalar = 0.9, b2: Scalar = 0.99, weight_decay: Scalar = 1e-3,
    *, mask: Any = None,
) -> GradientTransformation:  # fmt: skip
    """Lion (Chen et al., 2023; not in torch.optim), with optax's defaults::

        p <- p - learning_rate * (sign(b1 m + (1 - b1) g) + weight_decay * p)
        m <- b2 m + (1 - b2) g

    Use a learning rate 3-10x smaller than AdamW's. Chain: ``scale_by_lion,
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate``.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.lion(0.1, weight_decay=0.0)
    >>> p = {"w": torch.zeros(2)}
    >>> tx.update({"w": torch.tensor([0.2, -5.0])}, tx.init(p), p)[0]["w"]
    tensor([-0.1000,  0.1000])
    """
    return _named("lion", learning_rate, scale_by_lion(b1, b2), weight_decay=weight_decay, decoupled=True, mask=mask)
