"""Building blocks: small gradient transformations that chain into optimizers.

Each block is pure (``update`` returns new tensors, never writes into its inputs) and keeps
its own ``...State`` NamedTuple. Step counts are 0-d int64 tensors and hyperparameters may
be tensors (see :func:`ftrain.optim.inject_hyperparams`), so a compiled step never
recompiles when they change. Scalar bookkeeping (bias corrections, schedule values) is done
in float64 and cast to each leaf's dtype, which keeps float64 runs equal to torch.optim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from .. import tree
from .._validate import check_int
from ..tree import PyTree
from ._base import (
    SCALAR_DTYPE,
    EmptyState,
    GradientTransformation,
    Scalar,
    ScalarOrSchedule,
    cast_like,
    check_hyperparam,
    foreach_leaves,
    materialize,
    need_params,
    zero_count,
)
from ._report import report, report_gradient_norm, report_learning_rate
from ._wrappers import masked

__all__ = [
    "ClipByGlobalNormState",
    "EmaParamsState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByNadamState",
    "ScaleByRadamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "clip",
    "clip_by_global_norm",
    "ema_params",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "set_to_zero",
    "trace",
]


def _float_count(count: torch.Tensor) -> torch.Tensor:
    return count.to(SCALAR_DTYPE)


def _one_minus(x: Any) -> Any:
    return 1.0 - x


def _check_moment_decays(owner: str, b1: Any, b2: Any, eps: Any) -> None:
    check_hyperparam(owner, "b1", b1, high=1.0, high_open=True)
    check_hyperparam(owner, "b2", b2, high=1.0, high_open=True)
    check_hyperparam(owner, "eps", eps)


def _first_moment(updates: PyTree, mu: PyTree, decay: Any) -> PyTree:
    """``m <- decay * m + (1 - decay) * g``, as torch's ``exp_avg.lerp_(g, 1 - decay)`` (same rounding)."""
    lists = foreach_leaves(updates, mu, scalars=(decay,))
    if lists is not None:
        (g, m), spec = lists
        return tree.unflatten(spec, _foreach_first_moment(g, m, decay))
    return tree.map(lambda g, m: torch.lerp(m, g, cast_like(_one_minus(decay), m)), updates, mu)


def _second_moment(updates: PyTree, nu: PyTree, decay: Any) -> PyTree:
    """``v <- decay * v + (1 - decay) * g * g``, in torch's order of operations."""
    lists = foreach_leaves(updates, nu, scalars=(decay,))
    if lists is not None:
        (g, v), spec = lists
        return tree.unflatten(spec, _foreach_second_moment(g, v, decay))
    return tree.map(lambda g, v: v * cast_like(decay, v) + cast_like(_one_minus(decay), v) * g * g, updates, nu)


def _foreach_first_moment(g: list[torch.Tensor], m: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    return torch._foreach_lerp(m, g, 1.0 - decay)


def _foreach_second_moment(g: list[torch.Tensor], v: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    v = torch._foreach_mul(v, decay)  # (torch.optim's own foreach arithmetic)
    torch._foreach_addcmul_(v, g, g, 1.0 - decay)
    return v


# --- scaling -----------------------------------------------------------------------------


def scale(step_size: Scalar) -> GradientTransformation:
    """Multiply every update by ``step_size``: ``u <- step_size * u``.

    >>> import torch
    >>> tx = scale(-0.5)
    >>> tx.update({"w": torch.ones(2)}, tx.init(None))[0]["w"]
    tensor([-0.5000, -0.5000])
    """

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        lists = foreach_leaves(updates, scalars=(step_size,))
        if lists is not None:
            (u,), spec = lists
            return tree.unflatten(spec, torch._foreach_mul(u, step_size)), state
        return tree.map(lambda u: u * cast_like(step_size, u), updates), state

    return GradientTransformation(init, update)


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the number of updates so far (0-d int64)."""

    count: torch.Tensor


def scale_by_schedule(step_size_fn: Any) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)``, ``count`` being the number of updates before this one.

    ``step_size_fn`` maps a 0-d int64 tensor to a 0-d tensor (any :mod:`ftrain.schedules` function).
    The count lives in the state as a tensor, so a compiled step never recompiles as it grows.

    >>> import torch
    >>> from ftrain import schedules
    >>> tx = scale_by_schedule(schedules.linear(1.0, 0.0, transition_steps=2))
    >>> u, s = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))
    >>> u["w"], int(s.count)
    (tensor([1.]), 1)
    """
    if not callable(step_size_fn):
        raise TypeError(f"scale_by_schedule expects a function of the step count, got {step_size_fn!r}")

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(zero_count(params))

    def update(updates: PyTree, state: ScaleByScheduleState, params: PyTree = None):
        (s,) = materialize(torch.as_tensor(step_size_fn(state.count)))
        return tree.map(lambda u: u * s.to(u.dtype), updates), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (gradient *descent*); ``learning_rate`` may be a schedule.

    This is the ``lr`` of every ``torch.optim`` class: ``p <- p - lr * u``.

    >>> import torch
    >>> tx = scale_by_learning_rate(0.1)
    >>> tx.update({"w": torch.ones(1)}, tx.init(None))[0]["w"]
    tensor([-0.1000])
    """
    check_hyperparam("scale_by_learning_rate", "learning_rate", learning_rate)
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):

        def rate(count: torch.Tensor) -> torch.Tensor:
            value = torch.as_tensor(learning_rate(count))
            report("lr", value)  # a train step's "lr" metric
            return sign * value

        return scale_by_schedule(rate)
    fixed = scale(sign * learning_rate)

    def update(updates: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        report_learning_rate(learning_rate, updates)
        return fixed.update(updates, state, params)

    return GradientTransformation(fixed.init, update)


# --- weight decay and momentum -----------------------------------------------------------


def add_decayed_weights(weight_decay: Scalar = 0.0, mask: Any = None) -> GradientTransformation:
    """Add ``weight_decay * p`` to each update: ``u <- u + wd * p``.

    Before an adaptive block this is L2 regularisation (``torch.optim.Adam(weight_decay=...)``,
    ``SGD(weight_decay=...)``); after one and before the learning rate it is decoupled decay
    (``torch.optim.AdamW``: ``p <- p - lr * wd * p``). ``mask`` (a bool tree shaped like the params,
    or a function of the params returning one) limits the decay to the ``True`` leaves.

    >>> import torch
    >>> tx = add_decayed_weights(0.1)
    >>> p = {"w": torch.ones(1)}
    >>> tx.update({"w": torch.zeros(1)}, tx.init(p), p)[0]["w"]
    tensor([0.1000])
    """
    check_hyperparam("add_decayed_weights", "weight_decay", weight_decay)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        need_params("add_decayed_weights", params)
        lists = foreach_leaves(updates, params, scalars=(weight_decay,))
        if lists is not None:
            (u, p), spec = lists
            return tree.unflatten(spec, torch._foreach_add(u, p, alpha=weight_decay)), state
        return tree.map(lambda u, p: u + cast_like(weight_decay, p) * p, updates, params), state

    tx = GradientTransformation(init, update)
    return tx if mask is None else masked(tx, mask)


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer, shaped like the params."""

    trace: PyTree


def trace(decay: Scalar, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``b <- decay * b + u``; the update is ``b`` (or ``u + decay * b`` with ``nesterov``).

    Equals ``torch.optim.SGD(momentum=decay, nesterov=nesterov, dampening=0)``'s buffer (torch's
    first buffer is the first gradient, which is ``decay * 0 + u`` here).

    >>> import torch
    >>> tx = trace(0.9)
    >>> p = {"w": torch.zeros(1)}
    >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p))
    >>> u, s = tx.update({"w": torch.ones(1)}, s)
    >>> u["w"]
    tensor([1.9000])
    """
    check_hyperparam("trace", "decay", decay, high=1.0)

    def init(params: PyTree) -> TraceState:
        return TraceState(tree.zeros_like(params))

    def update(updates: PyTree, state: TraceState, params: PyTree = None):
        new_trace = tree.map(lambda u, b: u + cast_like(decay, b) * b, updates, state.trace)
        if nesterov:
            updates = tree.map(lambda u, b: u + cast_like(decay, b) * b, updates, new_trace)
        else:
            updates = new_trace
        return updates, TraceState(new_trace)

    return GradientTransformation(init, update)


# --- adaptive scalings ---------------------------------------------------------------------


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: count (0-d int64), first/second moments, and the running
    max of the second moment (``()`` unless ``amsgrad``)."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


def scale_by_adam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's rescaling, with torch.optim.Adam's exact formula.

    With ``t`` the 1-based step::

        m <- b1 * m + (1 - b1) * g          (torch: exp_avg.lerp_(g, 1 - beta1))
        v <- b2 * v + (1 - b2) * g * g
        v_max <- max(v_max, v)              (amsgrad only; v_max replaces v below)
        u <- (m / (1 - b1**t)) / (sqrt(v) / sqrt(1 - b2**t) + eps)

    ``eps`` sits outside the square root, after the bias correction, as in
    ``torch.optim.Adam(betas=(b1, b2), eps=eps, amsgrad=amsgrad)``.

    >>> import torch
    >>> tx = scale_by_adam()
    >>> p = {"w": torch.zeros(2)}
    >>> tx.update({"w": torch.tensor([2.0, -3.0])}, tx.init(p))[0]["w"].round(decimals=4)
    tensor([ 1., -1.])
    """
    _check_moment_decays("scale_by_adam", b1, b2, eps)

    def init(params: PyTree) -> ScaleByAdamState:
        # () rather than None when absent: torch's pytree (vmap, dynamo) takes None for a leaf.
        nu_max = tree.zeros_like(params) if amsgrad else ()
        return ScaleByAdamState(zero_count(params), tree.zeros_like(params), tree.zeros_like(params), nu_max)

    def update(updates: PyTree, state: ScaleByAdamState, params: PyTree = None):
        count = state.count + 1
        moments = (state.mu, state.nu, state.nu_max) if amsgrad else (state.mu, state.nu)
        lists = foreach_leaves(updates, *moments, scalars=(b1, b2, eps))
        if lists is not None:  # (eager: all leaves in a few foreach kernels, the trees flattened once)
            (g, m, v, *v_max), spec = lists
            return foreach_update(g, m, v, v_max, spec, count)
        t = _float_count(count)
        bc1, bc2_sqrt = materialize(1.0 - b1**t, torch.sqrt(1.0 - b2**t))
        mu, nu = _first_moment(updates, state.mu, b1), _second_moment(updates, state.nu, b2)
        nu_max = tree.map(torch.maximum, state.nu_max, nu) if amsgrad else ()

        def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            denom = torch.sqrt(v) / bc2_sqrt.to(v.dtype) + cast_like(eps, v)
            return (m / bc1.to(m.dtype)) / denom

        return tree.map(direction, mu, nu_max if amsgrad else nu), ScaleByAdamState(count, mu, nu, nu_max)

    def foreach_update(g: list, m: list, v: list, v_max: list, spec: Any, count: torch.Tensor):
        if tree.host_readable(count):
            # Python floats: the same bits as the float64 tensor ops, some 25 us less per step. (The
            # square root stays torch's: it rounds differently from Python's in the last bit.)
            t = float(count)
            bc1, bc2_sqrt = 1.0 - b1**t, torch.sqrt(torch.tensor(1.0 - b2**t, dtype=SCALAR_DTYPE))
        else:
            t = _float_count(count)
            bc1, bc2_sqrt = 1.0 - b1**t, torch.sqrt(1.0 - b2**t)
        m, v = _foreach_first_moment(g, m, b1), _foreach_second_moment(g, v, b2)
        v_max = torch._foreach_maximum(v_max[0], v) if amsgrad else ()
        denom = torch._foreach_sqrt(v_max if amsgrad else v)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(m, bc1)
        torch._foreach_div_(u, denom)
        mu, nu = tree.unflatten(spec, m), tree.unflatten(spec, v)
        return tree.unflatten(spec, u), ScaleByAdamState(count, mu, nu, tree.unflatten(spec, v_max) if amsgrad else ())

    return GradientTransformation(init, update)


class ScaleByNadamState(NamedTuple):
    """State of :func:`scale_by_nadam`: count, the running product of momentum factors, moments."""

    count: torch.Tensor
    mu_product: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_nadam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, momentum_decay: float = 4e-3
) -> GradientTransformation:
    """NAdam's rescaling with torch.optim.NAdam's momentum schedule.

    With ``t`` the 1-based step::

        mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
        P_t  = P_{t-1} * mu_t                        (P_0 = 1)
        m <- b1 * m + (1 - b1) * g;  v <- b2 * v + (1 - b2) * g * g
        d  = sqrt(v / (1 - b2**t)) + eps
        u <- (1 - mu_t) / (1 - P_t) * g / d + mu_{t+1} / (1 - P_t * mu_{t+1}) * m / d

    Equals ``torch.optim.NAdam(betas=(b1, b2), eps=eps, momentum_decay=momentum_decay)``.

    >>> import torch
    >>> tx = scale_by_nadam()
    >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))
    >>> bool(u["w"] > 0)
    True
    """
    _check_moment_decays("scale_by_nadam", b1, b2, eps)
    check_hyperparam("scale_by_nadam", "momentum_decay", momentum_decay)

    def init(params: PyTree) -> ScaleByNadamState:
        count = zero_count(params)
        one = torch.ones((), dtype=SCALAR_DTYPE, device=count.device)
        return ScaleByNadamState(count, one, tree.zeros_like(params), tree.zeros_like(params))

    def update(updates: PyTree, state: ScaleByNadamState, params: PyTree = None):
        count = state.count + 1
        t = _float_count(count)
        bc2 = 1.0 - b2**t
        mu_t = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * momentum_decay))
        mu_product = state.mu_product * mu_t
        coef_g = (1.0 - mu_t) / (1.0 - mu_product)
        coef_m = mu_next / (1.0 - mu_product * mu_next)
        bc2, coef_g, coef_m = materialize(bc2, coef_g, coef_m)
        mu, nu = _first_moment(updates, state.mu, b1), _second_moment(updates, state.nu, b2)

        def direction(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            denom = torch.sqrt(v / bc2.to(v.dtype)) + cast_like(eps, v)
            return coef_g.to(g.dtype) * g / denom + coef_m.to(m.dtype) * m / denom

        return tree.map(direction, updates, mu, nu), ScaleByNadamState(count, mu_product, mu, nu)

    return GradientTransformation(init, update)


class ScaleByRadamState(NamedTuple):
    """State of :func:`scale_by_radam`: count and moments."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_radam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, *, threshold: float = 5.0
) -> GradientTransformation:
    """RAdam's rectified rescaling, with torch.optim.RAdam's formula.

    With ``t`` the 1-based step, ``rho_inf = 2 / (1 - b2) - 1`` and
    ``rho_t = rho_inf - 2 t b2**t / (1 - b2**t)``::

        m_hat = m / (1 - b1**t)
        u <- m_hat * r_t * sqrt(1 - b2**t) / (sqrt(v) + eps)     if rho_t > threshold (5)
        u <- m_hat                                                otherwise
        r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))

    Equals ``torch.optim.RAdam(betas=(b1, b2), eps=eps)``. The branch is a ``torch.where`` on a
    tensor, so it compiles without a graph break.

    >>> import torch
    >>> tx = scale_by_radam()
    >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.zeros(1)}))[0]["w"]
    tensor([1.])
    """
    _check_moment_decays("scale_by_radam", b1, b2, eps)

    def init(params: PyTree) -> ScaleByRadamState:
        return ScaleByRadamState(zero_count(params), tree.zeros_like(params), tree.zeros_like(params))

    def update(updates: PyTree, state: ScaleByRadamState, params: PyTree = None):
        count = state.count + 1
        t = _float_count(count)
        bc1 = 1.0 - b1**t
        b2t = b2**t
        bc2 = 1.0 - b2t
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho_t = rho_inf - 2.0 * t * b2t / bc2
        rectify = rho_t > threshold
        # Clamp inside the sqrt so the branch not taken stays finite (no NaN leaks through where).
        rect = torch.sqrt(
            torch.clamp((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), min=0.0)
        )
        bc1, bc2_sqrt, rect, rectify = materialize(bc1, torch.sqrt(bc2), rect, rectify)
        rectify = rectify > 0
        mu, nu = _first_moment(updates, state.mu, b1), _second_moment(updates, state.nu, b2)

        def direction(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            m_hat = m / bc1.to(m.dtype)
            adaptive = bc2_sqrt.to(v.dtype) / (torch.sqrt(v) + cast_like(eps, v))
            return torch.where(rectify, m_hat * adaptive * rect.to(m.dtype), m_hat)

        return tree.map(direction, mu, nu), ScaleByRadamState(count, mu, nu)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: the running mean of squares, and of the gradient
    (``()`` unless ``centered``)."""

    nu: PyTree
    mu: PyTree


def scale_by_rms(
    decay: Scalar = 0.99, eps: Scalar = 1e-8, *, centered: bool = False, initial_scale: float = 0.0
) -> GradientTransformation:
    """RMSprop's rescaling, with torch.optim.RMSprop's formula (``decay`` is torch's ``alpha``)::

        v <- decay * v + (1 - decay) * g * g
        m <- decay * m + (1 - decay) * g                    (centered only)
        u <- g / (sqrt(v - m * m) + eps)   if centered else   g / (sqrt(v) + eps)

    ``eps`` is outside the square root, as in torch (optax puts it inside).

    >>> import torch
    >>> tx = scale_by_rms(decay=0.0)
    >>> tx.update({"w": torch.tensor([2.0])}, tx.init({"w": torch.zeros(1)}))[0]["w"]
    tensor([1.])
    """
    check_hyperparam("scale_by_rms", "decay", decay, high=1.0)
    check_hyperparam("scale_by_rms", "eps", eps)

    def init(params: PyTree) -> ScaleByRmsState:
        nu = tree.full_like(params, initial_scale)
        return ScaleByRmsState(nu, tree.zeros_like(params) if centered else ())

    def update(updates: PyTree, state: ScaleByRmsState, params: PyTree = None):
        nu = _second_moment(updates, state.nu, decay)
        if centered:
            mu = _first_moment(updates, state.mu, decay)
            updates = tree.map(lambda g, v, m: g / (torch.sqrt(v - m * m) + cast_like(eps, v)), updates, nu, mu)
        else:
            mu = ()
            updates = tree.map(lambda g, v: g / (torch.sqrt(v) + cast_like(eps, v)), updates, nu)
        return updates, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running sum of squared gradients."""

    sum_of_squares: PyTree


def scale_by_rss(initial_accumulator_value: float = 0.0, eps: Scalar = 1e-10) -> GradientTransformation:
    """Adagrad's rescaling, with torch.optim.Adagrad's formula::

        s <- s + g * g              (s starts at initial_accumulator_value)
        u <- g / (sqrt(s) + eps)

    >>> import torch
    >>> tx = scale_by_rss()
    >>> tx.update({"w": torch.tensor([-3.0])}, tx.init({"w": torch.zeros(1)}))[0]["w"]
    tensor([-1.])
    """
    check_hyperparam("scale_by_rss", "initial_accumulator_value", initial_accumulator_value)
    check_hyperparam("scale_by_rss", "eps", eps)

    def init(params: PyTree) -> ScaleByRssState:
        # zeros + value (not full_like): the value may be an injected 0-d tensor.
        return ScaleByRssState(
            tree.map(lambda x: torch.zeros_like(x) + cast_like(initial_accumulator_value, x), params)
        )

    def update(updates: PyTree, state: ScaleByRssState, params: PyTree = None):
        sums = tree.map(lambda g, s: s + g * g, updates, state.sum_of_squares)
        updates = tree.map(lambda g, s: g / (torch.sqrt(s) + cast_like(eps, s)), updates, sums)
        return updates, ScaleByRssState(sums)

    return GradientTransformation(init, update)


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: the momentum."""

    mu: PyTree


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion's sign update (Chen et al., 2023; torch.optim has no Lion)::

        u <- sign(b1 * m + (1 - b1) * g)
        m <- b2 * m + (1 - b2) * g

    >>> import torch
    >>> tx = scale_by_lion()
    >>> tx.update({"w": torch.tensor([0.3, -2.0])}, tx.init({"w": torch.zeros(2)}))[0]["w"]
    tensor([ 1., -1.])
    """
    check_hyperparam("scale_by_lion", "b1", b1, high=1.0, high_open=True)
    check_hyperparam("scale_by_lion", "b2", b2, high=1.0, high_open=True)

    def init(params: PyTree) -> ScaleByLionState:
        return ScaleByLionState(tree.zeros_like(params))

    def update(updates: PyTree, state: ScaleByLionState, params: PyTree = None):
        direction = tree.map(
            lambda g, m: torch.sign(cast_like(b1, m) * m + cast_like(_one_minus(b1), m) * g), updates, state.mu
        )
        mu = tree.map(lambda g, m: m * cast_like(b2, m) + cast_like(_one_minus(b2), m) * g, updates, state.mu)
        return direction, ScaleByLionState(mu)

    return GradientTransformation(init, update)


# --- clipping ------------------------------------------------------------------------------


def clip(max_delta: Scalar) -> GradientTransformation:
    """Clip each update element-wise to ``[-max_delta, max_delta]``
    (``torch.nn.utils.clip_grad_value_(clip_value=max_delta)``).

    >>> import torch
    >>> tx = clip(1.0)
    >>> tx.update({"w": torch.tensor([-3.0, 0.5])}, tx.init(None))[0]["w"]
    tensor([-1.0000,  0.5000])
    """
    check_hyperparam("clip", "max_delta", max_delta)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        def clip_leaf(u: torch.Tensor) -> torch.Tensor:
            m = cast_like(max_delta, u)
            return torch.clamp(u, -m, m)

        return tree.map(clip_leaf, updates), state

    return GradientTransformation(init, update)


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm` (none is kept)."""


def clip_by_global_norm(max_norm: Scalar) -> GradientTransformation:
    """Scale all updates together so their global L2 norm is at most ``max_norm``.

    Same formula as ``torch.nn.utils.clip_grad_norm_(max_norm=max_norm)``::

        n = sqrt(sum of squares of every element of every leaf)
        u <- u * min(1, max_norm / (n + 1e-6))

    The scale is a tensor (no host sync, no branch), so it compiles into the step.

    >>> import torch
    >>> tx = clip_by_global_norm(1.0)
    >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))
    >>> round(float(u["w"].norm()), 4)
    1.0
    """
    check_hyperparam("clip_by_global_norm", "max_norm", max_norm)

    def init(params: PyTree) -> ClipByGlobalNormState:
        return ClipByGlobalNormState()

    def update(updates: PyTree, state: ClipByGlobalNormState, params: PyTree = None):
        if not tree.leaves(updates):
            return updates, state
        norm = tree.global_norm(updates)
        report_gradient_norm(updates, norm)  # the step's "grad_norm" metric, when these are the raw gradients
        (coef,) = materialize(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return tree.map(lambda u: u * coef.to(u.dtype), updates), state

    return GradientTransformation(init, update)


# --- parameter averaging --------------------------------------------------------------------


class EmaParamsState(NamedTuple):
    """State of :func:`ema_params`: the number of updates seen and the moving average of the params."""

    count: torch.Tensor
    ema: PyTree


def ema_params(decay: Scalar = 0.999, *, start_step: int = 0, warmup: bool = False) -> GradientTransformation:
    """Keep an exponential moving average of the *params after this update*; updates pass through.

    Put it last in a chain, so ``params + updates`` are the new params. Like
    ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay))`` updated after
    every step: the first update copies the new params, then::

        ema <- decay * ema + (1 - decay) * (params + updates)

    Args:
        decay: the average's decay.
        start_step: the EMA copies the params for the first ``start_step + 1`` updates and
            averages after that (the early, fast-moving params are not worth remembering).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` averaged updates
            (``tf.train.ExponentialMovingAverage``'s ``num_updates``), so the average is not
            dominated by the first params while ``decay`` is close to 1.

    Read the average from the state (``opt_state[-1].ema`` for ``chain(..., ema_params(d))``),
    or take the whole state with it as params with :func:`ema_state` (to evaluate or export).

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.chain(optim.sgd(1.0), ema_params(0.5))
    >>> p = {"w": torch.zeros(1)}
    >>> s = tx.init(p)
    >>> u, s = tx.update({"w": torch.ones(1)}, s, p)     # new params: -1, ema = -1
    >>> p = optim.apply_updates(p, u)
    >>> u, s = tx.update({"w": torch.ones(1)}, s, p)     # new params: -2, ema = -1.5
    >>> s[-1].ema["w"]
    tensor([-1.5000])
    """
    check_hyperparam("ema_params", "decay", decay, high=1.0)
    check_int(start_step, "start_step", who="ema_params", low=0)

    def init(params: PyTree) -> EmaParamsState:
        return EmaParamsState(zero_count(params), tree.map(torch.clone, params))

    def update(updates: PyTree, state: EmaParamsState, params: PyTree = None):
        need_params("ema_params", params)
        copy = state.count <= start_step
        rate = decay
        if warmup:  # n >= 1 whenever it is used (it is not, while copying)
            n = (state.count - start_step).to(SCALAR_DTYPE)
            (rate,) = materialize(torch.clamp((1 + n) / (10 + n), max=decay))

        def average(e: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            new = (p + u).to(e.dtype)
            return torch.where(copy, new, torch.lerp(e, new, cast_like(_one_minus(rate), e)))

        ema = tree.map(average, state.ema, params, updates)
        return updates, EmaParamsState(state.count + 1, ema)

    return GradientTransformation(init, update)


def ema_state(state: Any) -> Any:
    """``state`` with the :func:`ema_params` average as its params: evaluate or export the EMA weights.

    The result is an ordinary state (``ftrain.evaluate(ema_state(state), eval_step, data)``,
    ``ema_state(state).to_module()``, ``ftrain.checkpoint.save_safetensors(ema_state(state), path)``);
    the average's tensors are shared, not copied: train on with the original ``state``, and
    clone the view (``tree.map(torch.clone, ...)``) to keep it while ``fit`` donates the state.

    >>> import torch, ftrain
    >>> from ftrain import optim
    >>> state = ftrain.TrainState.create(torch.nn.Linear(1, 1), optim.chain(optim.sgd(0.1), ema_params(0.9)))
    >>> ema_state(state).params["weight"] is state.opt_state[-1].ema["weight"]
    True
    """
    found = [
        node
        for node in optree.tree_leaves(state.opt_state, is_leaf=_is_ema_state, namespace=tree.NAMESPACE)
        if _is_ema_state(node)
    ]
    if len(found) != 1:
        raise ValueError(
            f"ema_state: the optimizer state holds {len(found)} optim.ema_params averages; it needs exactly one "
            "(put optim.ema_params(decay) last in the optimizer's chain)"
        )
    return state.replace(params=dict(found[0].ema))


def _is_ema_state(x: Any) -> bool:
    return isinstance(x, EmaParamsState)


def set_to_zero() -> GradientTransformation:
    """Replace every update with zeros: freezes the parameters it is applied to
    (e.g. a frozen backbone inside :func:`ftrain.optim.partition`).

    >>> import torch
    >>> tx = set_to_zero()
    >>> tx.update({"w": torch.ones(2)}, tx.init(None))[0]["w"]
    tensor([0., 0.])
    """

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        return tree.zeros_like(updates), state

    return GradientTransformation(init, update)
