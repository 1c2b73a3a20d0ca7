"""The pure parts a step is made of: its key, the loss and its gradients, and the train, eval and
predict cores that :mod:`._compiled` wraps (all traceable: each compiles into one graph)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import optim, random, tree
from .._module import BoundApply, ModuleApply, trainable
from .._state import TrainState
from ..precision import Policy
from ._checks import StepError, check_buffers_returned, check_loss, check_scalar, checking, describe

LossFn = Callable[..., Any]

NEEDS_LOSS_SCALE = (
    "precision {dtype} with loss scaling needs a state with a loss_scale field; {state} has none: "
    "build it with ftrain.precision.ScaledTrainState.create(...) (or add `loss_scale: DynamicScale` to your "
    "TrainState subclass)"
)
PYTHON_LOSS = (
    "loss_fn returned a Python {what} as the loss; return it as a 0-d tensor computed from the params, "
    "without .item() or float() (nothing can be differentiated through a Python number)"
)
NOT_DIVISIBLE = (
    "accumulate={n} splits every batch leaf along dim 0 into {n} equal micro-batches, but {where} is {what}; "
    "use a batch size divisible by {n}"
)


def step_key(state: TrainState) -> torch.Tensor:
    """The random key for this step: ``ftrain.random.fold_in(state.key, state.step)``.

    Every step gets fresh masks, and replaying a step from a saved state draws the same ones.

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
        >>> bool(torch.equal(step_key(state), ftrain.random.fold_in(state.key, 0)))
        True
    """
    return random.fold_in(state.key, state.step)


def bind_key(apply: Callable[..., Any], key: torch.Tensor) -> Callable[..., Any]:
    """``apply`` as a ``loss_fn`` gets it: a module's apply bound to ``key`` (see :class:`ftrain.ModuleApply`).

    So dropout is keyed by the step even when the ``loss_fn`` forgets ``key=key``. Any other
    ``apply_fn`` (your own function) is passed as it is.
    """
    return BoundApply(apply, key, record_updates=checking()) if isinstance(apply, ModuleApply) else apply


def split_loss_output(out: Any, buffers: dict) -> tuple[torch.Tensor, dict, dict]:
    """Normalize what a ``loss_fn`` returns to ``(loss, metrics, new_buffers)``.

    A ``loss_fn`` returns ``loss``, ``(loss, metrics)`` or ``(loss, metrics, new_buffers)``;
    missing metrics are ``{}`` and missing buffers are the ``buffers`` given.

    Example:
        >>> import torch
        >>> split_loss_output((torch.tensor(1.0), {"acc": torch.tensor(0.5)}), {})[1]
        {'acc': tensor(0.5000)}
    """
    if isinstance(out, torch.Tensor):
        return out, {}, buffers
    if isinstance(out, tuple) and len(out) in (2, 3):
        metrics = {} if out[1] is None else out[1]
        if not isinstance(metrics, Mapping):
            raise StepError(
                f"loss_fn returned a tuple whose second item is a {type(metrics).__name__}; it must be a dict of "
                "metrics: return loss, (loss, metrics) or (loss, metrics, new_buffers)"
            )
        return out[0], dict(metrics), (out[2] if len(out) == 3 else buffers)
    if isinstance(out, (int, float)):
        raise StepError(PYTHON_LOSS.format(what=type(out).__name__))
    raise StepError(f"loss_fn returned {describe(out)}; return loss, (loss, metrics) or (loss, metrics, new_buffers)")


def loss_and_grad(
    loss_fn: LossFn,
    apply: Callable[..., Any],
    params: dict,
    buffers: dict,
    batch: Any,
    key: torch.Tensor,
    *,
    precision: Policy | str | None = None,
    loss_scale: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor, dict, dict]:
    """Gradients of ``loss_fn`` w.r.t. ``params``: ``(grads, loss, metrics, new_buffers)``.

    ``loss_fn(apply, params, buffers, batch, key)`` is called once, under the precision policy's
    autocast; the loss is taken in float32. With ``loss_scale`` (a 0-d tensor) the loss is
    multiplied by it before the backward and the gradients divided by it after (float16).
    ``apply``'s frozen params (``requires_grad=False`` when the state was created) get no
    gradient: they are constants to autograd, and ``grads`` has no entry for them.

    The gradient is plain ``torch.autograd.grad`` on fresh leaves (pure all the same: nothing is
    accumulated into the state), traced into the step's one graph when compiled; under
    ``torch.func.vmap`` (an ensemble) it is ``torch.func.grad_and_value``.

    The ``apply`` the ``loss_fn`` receives is bound to ``key``: a call without ``key=`` draws its
    dropout masks from it too. On the step's checked first call, a ``loss_fn`` that leaves out
    the buffers its forward updated (it returns ``loss`` or ``(loss, metrics)`` although BatchNorm
    moved its running statistics) raises a :class:`StepError` naming them.

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     out, buffers = apply(params, buffers, batch)
        ...     return out.square().mean()
        >>> grads, loss, metrics, _ = loss_and_grad(loss_fn, state.apply_fn, state.params, state.buffers,
        ...                                         torch.ones(4, 2), step_key(state))
        >>> sorted(grads)
        ['bias', 'weight']
    """
    policy = Policy.coerce(precision)
    # (Full precision has no autocast to enter: no device to look up for it, every eager step.)
    autocast = (
        contextlib.nullcontext() if policy.compute_dtype is None else policy.autocast(tree.device_of(params).type)
    )
    bound = bind_key(apply, key)
    differentiated = trainable(apply, params)

    def differentiable(p: dict) -> tuple[torch.Tensor, tuple]:
        if differentiated is not params:  # (some are frozen: put them back in, in their places)
            p = {name: p.get(name, value) for name, value in params.items()}
        with autocast:
            out = loss_fn(bound, p, buffers, batch, key)
        loss, metrics, new_buffers = split_loss_output(out, buffers)
        if checking():
            check_loss(loss, metrics, buffers, new_buffers)
            check_buffers_returned(bound, buffers, new_buffers)
        loss = loss if loss.dtype == torch.float32 else loss.float()  # (no call per eager step when it is already)
        return (loss * loss_scale if loss_scale is not None else loss), (loss, metrics, new_buffers)

    if not _under_a_transform(params):
        grads, (loss, metrics, new_buffers) = _autograd(differentiable, differentiated, apply)
    else:  # under a torch.func transform (vmap of a step): autograd.grad cannot see through it
        grads, (_, (loss, metrics, new_buffers)) = torch.func.grad_and_value(differentiable, has_aux=True)(
            dict(differentiated)
        )
    if loss_scale is not None:
        grads = tree.map(lambda g: g / loss_scale, grads)
    return grads, loss.detach(), metric_dict(metrics), new_buffers


def _under_a_transform(params: dict) -> bool:
    """Is this called under ``torch.func.vmap`` (or another torch.func transform)?"""
    if torch.compiler.is_compiling():  # (dynamo cannot trace the level query; it traces this, vmap's case)
        return any(torch._C._functorch.is_batchedtensor(p) for p in params.values())
    return torch._C._functorch.maybe_current_level() is not None


def _autograd(differentiable: Callable, params: dict, apply: Any) -> tuple[dict, tuple]:
    """``differentiable``'s gradient w.r.t. ``params`` with ``torch.autograd.grad`` (see :func:`loss_and_grad`)."""
    # An eager backward may run the module again (activation checkpointing recomputes a segment):
    # the module's tensors stay bound until it is done. (Compiled, the graph holds the recompute.)
    hold = getattr(apply, "hold", None)
    eager = hold is not None and not torch.compiler.is_compiling()
    with torch.enable_grad(), hold() if eager else contextlib.nullcontext():
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        scaled, (loss, metrics, new_buffers) = differentiable(leaves)
        grads = torch.autograd.grad(scaled, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads)), (loss, _detached(metrics), _detached(new_buffers))


def _detached(values: Any) -> Any:
    """``values`` with the tensors that require grad detached.

    (A buffer or metric computed from the params would keep their graph alive in the state. One
    outside the graph, as BatchNorm's running statistics are, is kept as it is: no view per step;
    an empty dict, as most are, is not mapped at all.)
    """
    if type(values) is dict and not values:
        return values
    return tree.map(lambda x: x.detach() if isinstance(x, torch.Tensor) and x.requires_grad else x, values)


def train_core(
    loss_fn: LossFn, policy: Policy, accumulate: int, mesh: Any, *, step_metrics: bool = True
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The pure ``(state, batch) -> (new_state, metrics)`` that :func:`ftrain.make_train_step` compiles.

    With ``step_metrics`` the metrics also hold :func:`update_metrics`' ``grad_norm`` and ``lr``.
    """

    def train_core(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        key = step_key(state)
        scale = None
        if policy.loss_scaling:
            if not hasattr(state, "loss_scale"):
                raise StepError(NEEDS_LOSS_SCALE.format(dtype=policy.compute_dtype, state=type(state).__name__))
            scale = state.loss_scale.scale
        # Sharded (DTensor) params are all-gathered here, outside the grad transform (mesh.gather).
        params = mesh.gather(state.params) if mesh is not None else state.params
        if accumulate == 1:
            grads, loss, metrics, buffers = loss_and_grad(
                loss_fn, state.apply_fn, params, state.buffers, batch, key, precision=policy, loss_scale=scale
            )
        else:
            # An unrolled loop: one graph, one optimizer update; buffers (BatchNorm) thread through.
            buffers, sums = state.buffers, None
            for i, micro in enumerate(split_batch(batch, accumulate)):
                grads, loss, metrics, buffers = loss_and_grad(
                    loss_fn, state.apply_fn, params, buffers, micro, random.fold_in(key, i), precision=policy,
                    loss_scale=scale,
                )  # fmt: skip
                part = (grads, loss, metrics)
                sums = part if sums is None else tree.map(torch.add, sums, part)
            grads, loss, metrics = tree.map(lambda x: x / accumulate, sums)
        metrics = {**metrics, "loss": loss}
        if mesh is not None:
            # One call, so the metrics and the new float buffers (BatchNorm's running stats, which
            # each rank updated from its own slice) ride in the gradients' packed all-reduce.
            like = (trainable(state.apply_fn, state.params), metrics, buffers)
            grads, metrics, buffers = mesh.pmean((grads, metrics, buffers), like=like)
        if step_metrics:
            new, reported = optim.record(state.apply_gradients, grads, gradients=grads, buffers=buffers)
            metrics = {**update_metrics(grads, reported), **metrics}
        else:
            new = state.apply_gradients(grads, buffers=buffers)
        if policy.loss_scaling:
            # Skip the update on overflow (keep params, optimizer state and buffers) and back off.
            finite = tree.all_finite(grads)
            kept = tree.where(
                finite, (new.params, new.opt_state, new.buffers), (state.params, state.opt_state, state.buffers)
            )
            new = new.replace(
                params=kept[0], opt_state=kept[1], buffers=kept[2], loss_scale=policy.adjust(state.loss_scale, finite)
            )
            metrics = {**metrics, "loss_scale": scale, "grads_finite": finite.to(torch.float32)}
        return new, metrics

    return train_core


def update_metrics(grads: dict, reported: dict) -> dict:
    """A train step's default metrics: ``grad_norm`` and the learning rate(s) the update used.

    ``grad_norm`` is the global L2 norm of the gradients the optimizer was given (after the
    mesh's average and the loss scale's division): the one ``optim.clip_by_global_norm``
    computed when it saw them first, else computed here. ``lr`` (``lr/<group>`` under
    ``optim.partition``) is what the update reported (:func:`ftrain.optim.record`); an
    optimizer without a learning rate reports none.

    Example:
        >>> import torch
        >>> sorted(update_metrics({"w": torch.tensor([3.0, 4.0])}, {"lr": torch.tensor(0.1)}).items())
        [('grad_norm', tensor(5.)), ('lr', tensor(0.1000))]
    """
    if "grad_norm" in reported:
        return reported
    norm = tree.global_norm(grads)
    if norm.requires_grad or norm.dtype != torch.float32:  # (eager, it is neither: no alias per step)
        norm = norm.detach().float()
    return {"grad_norm": norm, **reported}


def eval_core(loss_fn: LossFn, policy: Policy) -> Callable[[TrainState, Any], dict]:
    """The pure ``(state, batch) -> metrics`` that :func:`ftrain.make_eval_step` compiles."""

    def eval_core(state: TrainState, batch: Any) -> dict:
        with policy.autocast(tree.device_of(state).type):
            key = step_key(state)
            out = loss_fn(bind_key(state.apply_fn, key), state.params, state.buffers, batch, key)
        loss, metrics, _ = split_loss_output(out, state.buffers)
        if checking():
            check_scalar("loss", loss)
        return {**metric_dict(metrics), "loss": loss.detach().float()}

    return eval_core


def default_predict(apply: Callable, params: dict, buffers: dict, batch: Any, key: torch.Tensor) -> Any:
    """The model's output on the batch, or on ``batch[0]`` when the batch is a tuple/list such as ``(x, y)``."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return apply(params, buffers, inputs)[0]


def predict_core(predict_fn: LossFn, policy: Policy) -> Callable[[TrainState, Any], Any]:
    """The pure ``(state, batch) -> outputs`` that :func:`ftrain.make_predict_step` compiles."""

    def predict_core(state: TrainState, batch: Any) -> Any:
        with policy.autocast(tree.device_of(state).type):
            key = step_key(state)
            return predict_fn(bind_key(state.apply_fn, key), state.params, state.buffers, batch, key)

    return predict_core


def split_batch(batch: Any, n: int) -> list[Any]:
    """``batch`` cut along dim 0 into ``n`` equal micro-batches (a :class:`StepError` if it does not divide)."""
    paths, leaves, spec = tree.flatten_with_path(batch)
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % n:
            where = f"batch{'' if path == '<root>' else path}"
            raise StepError(NOT_DIVISIBLE.format(n=n, where=where, what=describe(x)))
    chunks = [x.chunk(n) for x in leaves]
    return [tree.unflatten(spec, [c[i] for c in chunks]) for i in range(n)]


def metric_dict(metrics: dict) -> dict:
    """``metrics`` as detached tensors (Python numbers become 0-d tensors)."""
    return {k: (v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in metrics.items()}
