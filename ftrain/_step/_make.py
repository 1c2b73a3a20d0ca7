"""The public step builders: a train, eval or predict step from a ``loss_fn``, or your own step compiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._validate import check_int
from ..precision import Policy
from ._checks import check_function
from ._compiled import EvalStep, NewShapes, PredictStep, TrainStep
from ._grad import LossFn, default_predict, eval_core, predict_core, train_core

LOSS_FN = "loss_fn(apply, params, buffers, batch, key)"


def make_train_step(
    loss_fn: LossFn,
    *,
    compile: bool = True,
    mesh: Any = None,
    precision: Policy | str | None = None,
    accumulate: int = 1,
    deterministic: bool = True,
    new_shapes: NewShapes = "error",
    backend: str | Callable = "inductor",
    step_metrics: bool = True,
    cache: bool = True,
    fullgraph: bool = True,
) -> TrainStep:
    """Build ``train_step(state, batch) -> (new_state, metrics)`` from a loss function.

    Args:
        loss_fn: ``loss_fn(apply, params, buffers, batch, key)`` returning ``loss``,
            ``(loss, metrics)`` or ``(loss, metrics, new_buffers)``. ``apply`` is
            ``state.apply_fn``: ``apply(params, buffers, *inputs, key=key)`` returns
            ``(output, new_buffers)``; pass ``key=key`` so dropout is driven by the step's key.
            Return the new buffers when the model has BatchNorm.
        compile: compile the whole step with ``torch.compile(fullgraph=True)``; ``False`` runs
            the same pure function eagerly (for debugging; same results).
        mesh: an :class:`ftrain.Mesh`; gradients and metrics are averaged over its ``dp`` axis
            inside the step (``mesh.pmean``), the metrics packed into the gradients' all-reduce
            so they cost no extra collective. ``None``: nothing is reduced.
        precision: ``None``/``"fp32"``, ``"bf16"``, ``"fp16"`` or a :class:`ftrain.precision.Policy`.
            float16 scales the loss dynamically and needs a state with a ``loss_scale`` field
            (:class:`ftrain.precision.ScaledTrainState`); overflowing steps are skipped.
        accumulate: split each batch into this many micro-batches along dim 0 and accumulate
            their gradients inside the one compiled step (an unrolled loop: one graph, one
            optimizer update per call, peak activation memory of one micro-batch). This is
            preferred over ``optim.MultiSteps`` when the whole batch arrives at once: the step
            counter, schedules and logging then count real updates, and no gradient
            accumulator lives in the state. Use ``optim.MultiSteps`` when the data pipeline
            can only deliver one micro-batch per call. Metrics are averaged over micro-batches.
        deterministic: run with ``torch.use_deterministic_algorithms(True)`` (bitwise
            reproducible runs; cost nothing measurable on CPU). ``False`` leaves the global
            setting as it is. Eager steps leave out that mode's NaN fill of fresh allocations
            (``torch.utils.deterministic.fill_uninitialized_memory``), which changes a result
            only where a kernel reads memory it never wrote; to keep it, turn the mode on yourself.
        new_shapes: what a batch with other shapes than the first does: ``"error"`` (default:
            a clear error, e.g. for a partial last batch) or ``"recompile"`` (at most one more
            compile, with a dynamic batch dim).
        backend: the ``torch.compile`` backend.
        step_metrics: add ``grad_norm`` (the global L2 norm of the gradients; the one
            ``optim.clip_by_global_norm`` computes when it comes first in the chain) and
            ``lr`` (the learning rate the update used; ``lr/<group>`` for each group of an
            ``optim.partition``) to the metrics. They are computed inside the step, so they
            cost no host sync; ``fit`` logs them as ``train/grad_norm`` and ``train/lr``. A
            metric of the same name from ``loss_fn`` wins. ``False``: only the loss_fn's metrics.
        cache: serve the compiled step from ftrain's persistent cache (``$FTRAIN_CACHE_DIR``,
            by default ``~/.cache/ftrain``) when a process compiled it before, and save it
            there when not, so a rerun starts without compiling. ``False`` compiles it in this
            process, every time. See the Steps page for what the cache key covers.
        fullgraph: ``True`` (default): the step is one graph, and Python the compiler cannot trace
            (a branch on a tensor's value, an unknown C call) is a :class:`StepError` naming the
            line. ``False`` lets torch break the step into several graphs there: still correct
            and compiled once, slower (it warns once with the breaks and where they are; see
            docs/your-model.md).

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(4, 2), ftrain.optim.sgd(0.1))
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     logits, buffers = apply(params, buffers, batch[0], key=key)
        ...     return torch.nn.functional.cross_entropy(logits, batch[1]), {}, buffers
        >>> train_step = ftrain.make_train_step(loss_fn, compile=False)
        >>> new_state, metrics = train_step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
        >>> int(new_state.step), sorted(metrics), round(float(metrics["lr"]), 6)
        (1, ['grad_norm', 'loss', 'lr'], 0.1)
    """
    check_function(loss_fn, "make_train_step", LOSS_FN)
    check_int(accumulate, "accumulate", who="make_train_step")
    if mesh is not None and not callable(getattr(mesh, "pmean", None)):
        raise TypeError(f"make_train_step: mesh must be an ftrain.Mesh (with .pmean), got {type(mesh).__name__}")
    policy = Policy.coerce(precision)
    core = train_core(loss_fn, policy, accumulate, mesh, step_metrics=step_metrics)
    return TrainStep(
        core,
        in_place=not policy.loss_scaling,  # (a skipped overflowing step keeps the input's values)
        compile=compile,
        deterministic=deterministic,
        new_shapes=new_shapes,
        backend=backend,
        cache=cache,
        fullgraph=fullgraph,
    )


def make_eval_step(
    loss_fn: LossFn,
    *,
    compile: bool = True,
    precision: Policy | str | None = None,
    deterministic: bool = True,
    new_shapes: NewShapes = "recompile",
    backend: str | Callable = "inductor",
    mesh: Any = None,
    cache: bool = True,
    fullgraph: bool = True,
) -> EvalStep:
    """Build ``eval_step(state, batch) -> metrics`` from the same ``loss_fn`` as the train step.

    The module runs in eval mode (dropout off, BatchNorm uses running stats); buffers returned
    by ``loss_fn`` are discarded. Metrics are the loss_fn's metrics plus ``"loss"``. A batch of
    another size (the last, partial one) compiles once more by default (``new_shapes``).
    With ``mesh`` (an :class:`ftrain.Mesh`), :func:`ftrain.evaluate` and the ``Evaluate`` action
    reduce this step's metrics over the mesh's ranks, each evaluating its own slice of the data.
    The other arguments are :func:`make_train_step`'s.

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(4, 1), ftrain.optim.identity())
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     return apply(params, buffers, batch)[0].square().mean()
        >>> eval_step = ftrain.make_eval_step(loss_fn, compile=False)
        >>> sorted(eval_step(state, torch.ones(3, 4)))
        ['loss']
    """
    check_function(loss_fn, "make_eval_step", LOSS_FN)
    core = eval_core(loss_fn, Policy.coerce(precision))
    step = EvalStep(
        core,
        compile=compile,
        deterministic=deterministic,
        new_shapes=new_shapes,
        backend=backend,
        cache=cache,
        fullgraph=fullgraph,
    )
    step.mesh = mesh
    return step


def make_predict_step(
    predict_fn: LossFn | None = None,
    *,
    compile: bool = True,
    cache: bool = True,
    precision: Policy | str | None = None,
    deterministic: bool = True,
    new_shapes: NewShapes = "recompile",
    backend: str | Callable = "inductor",
    fullgraph: bool = True,
) -> PredictStep:
    """Build ``predict_step(state, batch) -> outputs`` (module in eval mode).

    ``predict_fn(apply, params, buffers, batch, key)`` returns the outputs; by default the
    model is applied to the batch (or to ``batch[0]`` when the batch is a tuple/list such as
    ``(x, y)``) and its output returned. The other arguments are :func:`make_eval_step`'s.

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(4, 3), ftrain.optim.identity())
        >>> predict_step = ftrain.make_predict_step(compile=False)
        >>> predict_step(state, torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """
    if predict_fn is None:
        predict_fn = default_predict
    check_function(predict_fn, "make_predict_step", LOSS_FN)
    core = predict_core(predict_fn, Policy.coerce(precision))
    return PredictStep(
        core,
        compile=compile,
        deterministic=deterministic,
        new_shapes=new_shapes,
        backend=backend,
        cache=cache,
        fullgraph=fullgraph,
    )


def compile_step(
    fn: Callable[[Any, Any], tuple[Any, dict]],
    *,
    compile: bool = True,
    deterministic: bool = True,
    new_shapes: NewShapes = "error",
    backend: str | Callable = "inductor",
    cache: bool = True,
    fullgraph: bool = True,
) -> TrainStep:
    """Compile your own pure ``fn(state, batch) -> (new_state, metrics)`` as a train step.

    It gets what :func:`make_train_step` gives: one graph, the fake-tensor check before the
    first compile, ``.donate``, determinism, the batch-shape policy and the persistent cache
    (``cache=False`` opts out). Build ``fn`` from
    :func:`step_key`, :func:`loss_and_grad` and :meth:`TrainState.apply_gradients` (or
    ``tx.update`` + ``optim.apply_updates`` for a second optimizer); ``torch.func.vmap`` of a
    train step compiles too (an ensemble in one graph).

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     return apply(params, buffers, batch)[0].square().mean()
        >>> def my_step(state, batch):
        ...     grads, loss, _, buffers = ftrain.loss_and_grad(
        ...         loss_fn, state.apply_fn, state.params, state.buffers, batch, ftrain.step_key(state))
        ...     return state.apply_gradients(grads, buffers=buffers), {"loss": loss}
        >>> step = ftrain.compile_step(my_step, compile=False)
        >>> int(step(state, torch.ones(3, 2))[0].step)
        1
    """
    check_function(fn, "compile_step", "fn(state, batch) -> (state, metrics)")
    return TrainStep(
        fn,
        compile=compile,
        deterministic=deterministic,
        new_shapes=new_shapes,
        backend=backend,
        cache=cache,
        fullgraph=fullgraph,
    )
