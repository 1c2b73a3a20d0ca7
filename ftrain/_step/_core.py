"""Pure training, evaluation and prediction steps, each compiled whole with ``torch.compile``.

A step is a pure function of ``(state, batch)``. :func:`make_train_step` builds one from a
``loss_fn`` written against the pure model; :func:`compile_step` compiles a step you wrote
yourself from the same parts (:func:`step_key`, :func:`loss_and_grad`,
:meth:`TrainState.apply_gradients`). The forward, backward, optimizer update and metrics are one
compiled graph (``fullgraph=True``); step, learning rate, loss scale and key are tensors in the
state, so the graph is compiled once and never again.

What a step call does around the compiled graph (and nothing more, it is the hot path):
it checks that the state was not donated, compares the batch's shapes and dtypes with the first
batch's, and runs under ``torch.no_grad()`` (``torch.func`` still differentiates; params that
carried ``requires_grad`` would chain an autograd graph from step to step and leak memory) and
with ``torch.use_deterministic_algorithms(True)`` unless ``deterministic=False``.

Before the first compile the step runs once on fake tensors (shapes only, no compute), so a
loss that is not a scalar, not differentiable w.r.t. the params, a metric that is not a scalar,
or a batch the model cannot take is reported in a few lines instead of a dynamo trace.

Partial batches: the first batch fixes the shapes. A train step given a batch of another shape
raises (by default: ``new_shapes="error"``), because a smaller last batch would compile a second
graph and weight its samples differently; drop it (``ftrain.data.Loader(drop_last=True)``, the
default) or pad it. ``new_shapes="recompile"`` (the default for eval and predict steps, where
dropping samples would change the result) allows it: torch then compiles once more with a
dynamic batch dim, which serves every later size, so there is never more than one recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.utils._pytree as torch_pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import random, tree
from .._module import ModuleApply
from .._state import TrainState
from ..precision import Policy, all_finite, select

__all__ = [
    "DonatedStateError",
    "EvalStep",
    "PredictStep",
    "StepError",
    "TrainStep",
    "compile_step",
    "loss_and_grad",
    "make_eval_step",
    "make_predict_step",
    "make_train_step",
    "split_loss_output",
    "stack_states",
    "step_key",
    "unstack_state",
    "vmap_step",
]

LossFn = Callable[..., Any]
NewShapes = Literal["error", "recompile"]


class StepError(ValueError):
    """A step was given something it cannot run: the message says what and how to fix it."""


class DonatedStateError(RuntimeError):
    """A state was used after it was donated to ``train_step.donate``."""


# ----------------------------------------------------------------------------------------------
# The parts a custom step is made of (all pure and traceable).


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
    raise StepError(f"loss_fn returned {_describe(out)}; return loss, (loss, metrics) or (loss, metrics, new_buffers)")


# Set only while a step is checked on fake tensors before compiling: the checks below are then
# plain Python on shapes and flags, and are never traced into a compiled graph.
_CHECKING = False


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
    Built on ``torch.func.grad_and_value``, so it is pure and compiles to one graph.

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
    device_type = _device_type(params)

    def differentiable(p: dict) -> tuple[torch.Tensor, tuple]:
        with policy.autocast(device_type):
            out = loss_fn(apply, p, buffers, batch, key)
        loss, metrics, new_buffers = split_loss_output(out, buffers)
        if _CHECKING:
            _check_loss(loss, metrics, buffers, new_buffers)
        loss = loss.float()
        return (loss * loss_scale if loss_scale is not None else loss), (loss, metrics, new_buffers)

    grads, (_, (loss, metrics, new_buffers)) = torch.func.grad_and_value(differentiable, has_aux=True)(params)
    if loss_scale is not None:
        grads = tree.map(lambda g: g / loss_scale, grads)
    return grads, loss.detach(), _metric_dict(metrics), new_buffers


def _train_core(
    loss_fn: LossFn, policy: Policy, accumulate: int, mesh: Any
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    def train_core(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        key = step_key(state)
        scale = None
        if policy.loss_scaling:
            if not hasattr(state, "loss_scale"):
                raise StepError(
                    f"precision {policy.compute_dtype} with loss scaling needs a state with a loss_scale field; "
                    f"{type(state).__name__} has none: build it with ftrain.precision.ScaledTrainState.create(...) "
                    "(or add `loss_scale: DynamicScale` to your TrainState subclass)"
                )
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
            for i, micro in enumerate(_split_batch(batch, accumulate)):
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
            grads, metrics, buffers = mesh.pmean((grads, metrics, buffers), like=(state.params, metrics, buffers))
        new = state.apply_gradients(grads, buffers=buffers)
        if policy.loss_scaling:
            # Skip the update on overflow (keep params, optimizer state and buffers) and back off.
            finite = all_finite(grads)
            kept = select(
                finite, (new.params, new.opt_state, new.buffers), (state.params, state.opt_state, state.buffers)
            )
            new = new.replace(
                params=kept[0], opt_state=kept[1], buffers=kept[2], loss_scale=policy.adjust(state.loss_scale, finite)
            )
            metrics = {**metrics, "loss_scale": scale, "grads_finite": finite.to(torch.float32)}
        return new, metrics

    return train_core


def _eval_core(loss_fn: LossFn, policy: Policy) -> Callable[[TrainState, Any], dict]:
    def eval_core(state: TrainState, batch: Any) -> dict:
        with policy.autocast(_device_type(state.params)):
            out = loss_fn(state.apply_fn, state.params, state.buffers, batch, step_key(state))
        loss, metrics, _ = split_loss_output(out, state.buffers)
        if _CHECKING:
            _check_scalar("loss", loss)
        return {**_metric_dict(metrics), "loss": loss.detach().float()}

    return eval_core


def _default_predict(apply: Callable, params: dict, buffers: dict, batch: Any, key: torch.Tensor) -> Any:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return apply(params, buffers, inputs)[0]


def _predict_core(predict_fn: LossFn, policy: Policy) -> Callable[[TrainState, Any], Any]:
    def predict_core(state: TrainState, batch: Any) -> Any:
        with policy.autocast(_device_type(state.params)):
            return predict_fn(state.apply_fn, state.params, state.buffers, batch, step_key(state))

    return predict_core


# ----------------------------------------------------------------------------------------------
# Steps: a compiled pure function plus the few cheap checks around it.


class _StepMode:
    """What a step runs under: no autograd recording, deterministic algorithms unless opted out,
    the module in train (or eval) mode; the previous settings come back on exit.

    A plain class, not ``contextlib.contextmanager``: it is entered on every step (hot path).
    """

    __slots__ = ("state", "deterministic", "train_mode", "grad", "set_deterministic", "module")

    def __init__(self, state: Any, deterministic: bool, train_mode: bool):
        self.state, self.deterministic, self.train_mode = state, deterministic, train_mode

    def __enter__(self) -> None:
        self.grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        self.set_deterministic = self.deterministic and not torch.are_deterministic_algorithms_enabled()
        if self.set_deterministic:
            torch.use_deterministic_algorithms(True)
        apply = getattr(self.state, "apply_fn", None)
        self.module = (
            apply.module if isinstance(apply, ModuleApply) and apply.module.training != self.train_mode else None
        )
        if self.module is not None:
            self.module.train(self.train_mode)

    def __exit__(self, *exc: object) -> None:
        if self.module is not None:
            self.module.train(not self.train_mode)
        if self.set_deterministic:
            torch.use_deterministic_algorithms(False)
        torch._C._set_grad_enabled(self.grad)


class _Step:
    kind = "step"
    _train_mode = True

    def __init__(
        self,
        core: Callable[..., Any],
        *,
        compile: bool,
        deterministic: bool,
        new_shapes: NewShapes,
        backend: str | Callable = "inductor",
    ):
        if new_shapes not in ("error", "recompile"):
            raise ValueError(f"new_shapes must be 'error' or 'recompile', got {new_shapes!r}")
        self.core = core
        self.compiled = compile
        self.deterministic = deterministic
        self.new_shapes = new_shapes
        self._backend = backend
        self._counters: list[_CountingBackend] = []
        self._fn = self._compile(core) if compile else core
        self._signature: tuple | None = None  # the first batch's
        self._seen: set[tuple] = set()  # every batch signature checked so far
        self._ran: set[int] = set()

    @property
    def num_compiles(self) -> int:
        """How many graphs torch has compiled for this step so far (1 after the first call)."""
        return sum(c.count for c in self._counters)

    def _compile(self, fn: Callable) -> Callable:
        counter = _CountingBackend(self._backend)
        self._counters.append(counter)
        return torch.compile(fn, fullgraph=True, backend=counter)

    def _direct(self) -> bool:
        # Under torch.func.vmap/grad or while dynamo traces an outer function, be just the pure core.
        return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None

    def _admit(self, state: Any, batch: Any) -> None:
        _check_alive(state)
        leaves, spec = tree.flatten(batch)  # (the hot path: paths only when something differs)
        signature = (spec, tuple((x.shape, x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves))
        if signature in self._seen:
            return
        if self._signature is not None and self.new_shapes == "error":
            self._compare(signature, tree.flatten_with_path(batch)[0])
        if self.compiled:
            self._precheck(state, batch)
        if self._signature is None:
            self._signature = signature
        if len(self._seen) < 64:  # (bounded: a stream of new shapes only re-runs the cheap fake check)
            self._seen.add(signature)

    def _compare(self, signature: tuple, paths: list[str]) -> None:
        spec0, sig0 = self._signature
        spec, sig = signature
        if spec != spec0:
            raise StepError(
                f"{self.kind}: this batch's structure {spec} differs from the first batch's {spec0}; "
                "every batch must have the same structure (or pass new_shapes='recompile')"
            )
        for path, a, b in zip(paths, sig, sig0):
            if a == b:
                continue
            where = f"batch{'' if path == '<root>' else path}"
            if not (isinstance(a, tuple) and isinstance(b, tuple)):
                raise StepError(
                    f"{self.kind}: {where} is {a!r} but was {b!r} in the first batch; non-tensor batch items must not change"
                )
            (shape, dtype), (shape0, dtype0) = a, b
            if dtype != dtype0:
                raise StepError(
                    f"{self.kind}: {where} has dtype {dtype} but the first batch had {dtype0}; "
                    f"cast it (x.to({dtype0})) so the compiled step is reused"
                )
            if len(shape) == len(shape0) >= 1 and shape[1:] == shape0[1:]:
                raise StepError(
                    f"{self.kind}: {where} has batch size {shape[0]} but the step was compiled for {shape0[0]}: "
                    "a partial last batch? Drop it (ftrain.data.Loader(drop_last=True)) or pad it, or pass "
                    "new_shapes='recompile' to allow one more compile with a dynamic batch dim"
                )
            raise StepError(
                f"{self.kind}: {where} has shape {tuple(shape)} but the first batch had {tuple(shape0)}; pass "
                "new_shapes='recompile' if shapes really vary (one recompile, then a dynamic-shape graph)"
            )

    def _precheck(self, state: Any, batch: Any) -> None:
        """Run the step on fake tensors: catches bad losses and bad batches before dynamo sees them."""
        global _CHECKING
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = lambda t: fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        fake_state, fake_batch = tree.map(fake, state), tree.map(fake, batch)
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        disabled, fake_log.disabled = fake_log.disabled, True  # it logs every failing meta kernel
        _CHECKING = True
        try:
            with fake_mode, self._context(state):
                out = self.core(fake_state, fake_batch)
            self._check_output(state, out)
        except (StepError, DonatedStateError):
            raise
        except Exception as e:
            raise StepError(
                f"{self.kind} failed on a batch of {_describe(batch)} (checked before compiling, on fake tensors): "
                f"{type(e).__name__}: {e}{_user_frame(e)}\nRun make_{self.kind}(..., compile=False) for the eager traceback."
            ) from None
        finally:
            _CHECKING = False
            fake_log.disabled = disabled

    def _check_output(self, state: Any, out: Any) -> None:
        pass

    def _context(self, state: Any) -> _StepMode:
        return _StepMode(state, self.deterministic, self._train_mode)

    def _run(self, fn: Callable, state: Any, batch: Any, check_output: bool = True) -> Any:
        if id(fn) in self._ran:
            with self._context(state):
                return fn(state, batch)
        with self._context(state):
            global _CHECKING
            _CHECKING = not self.compiled  # eager: check the first call on the real tensors
            try:
                out = fn(state, batch)
            except Exception:
                if not self.compiled:
                    raise
                # A failure dynamo's fake tensors missed: the eager error names the real problem.
                eager_error = _eager_error(self.core, state, batch)
                if eager_error is None:
                    raise
                raise StepError(
                    f"{self.kind} failed on a batch of {_describe(batch)}: {type(eager_error).__name__}: {eager_error}"
                    f"{_user_frame(eager_error)}\nRun make_{self.kind}(..., compile=False) for the eager traceback."
                ) from eager_error  # not from the compiler's error: its trace is hundreds of lines
            finally:
                _CHECKING = False
            if not self.compiled and check_output:
                self._check_output(state, out)
            self._ran.add(id(fn))
            return out


class TrainStep(_Step):
    """``train_step(state, batch) -> (new_state, metrics)``: pure; ``train_step.donate`` reuses memory.

    Made by :func:`make_train_step` or :func:`compile_step`. ``metrics`` is a dict of 0-d tensors
    (no host sync). Attributes: ``core`` (the uncompiled pure function), ``num_compiles``.
    """

    kind = "train_step"

    def __init__(self, core: Callable, **kwargs: Any):
        super().__init__(core, **kwargs)
        self._donating: Callable | None = None

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One pure step: ``state`` is left untouched."""
        if self._direct():
            return self.core(state, batch)
        self._admit(state, batch)
        return self._run(self._fn, state, batch)

    def donate(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """The same step, computed into ``state``'s own memory (peak memory ~4x params instead of ~7x).

        ``state`` is consumed: its tensors now hold the new values, and any later use of it
        (another step, ``state.params``, a checkpoint) raises :class:`DonatedStateError`. Use the
        state this returns. Do not donate a state whose tensors are shared with something you
        still need (an async checkpoint still writing it, an EMA holding the same tensors).
        """
        if self._direct():
            return self.core(state, batch)
        self._admit(state, batch)
        if state not in _TRUSTED:
            _check_no_aliasing(state)
        if self._donating is None:
            fn = _donating(self.core)
            self._donating = self._compile(fn) if self.compiled else fn
        metrics = self._run(self._donating, state, batch, check_output=False)
        new_state = _hand_over(state)
        with contextlib.suppress(TypeError):  # (a plain dict state cannot be weakly referenced: checked each time)
            _TRUSTED.add(new_state)
        return new_state, metrics

    def _check_output(self, state: Any, out: Any) -> None:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise StepError(f"a train step must return (state, metrics), got {_describe(out)}")
        new_state, metrics = out
        if new_state is None:  # the donating form returns only metrics
            return
        if type(new_state) is not type(state):
            raise StepError(f"a train step must return a {type(state).__name__} first, got {_describe(new_state)}")
        old_paths, old_leaves, old_spec = tree.flatten_with_path(state)
        new_paths, new_leaves, new_spec = tree.flatten_with_path(new_state)
        if old_spec != new_spec:
            tree.assert_same_structure(state, new_state, names=["the state passed in", "the state returned"])
            raise StepError(
                "the state returned has different static fields (apply_fn/tx) than the one passed in; "
                "a step may only change leaves"
            )
        for path, a, b in zip(old_paths, old_leaves, new_leaves):
            if isinstance(a, torch.Tensor) and (
                not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype
            ):
                raise StepError(
                    f"the step changed state.{path} from {_describe(a)} to {_describe(b)}; a leaf must keep its shape "
                    "and dtype, or every step would compile a new graph"
                )
        _check_metrics(metrics, scalar=False)  # (an ensemble step's metrics have one value per member)


class EvalStep(_Step):
    """``eval_step(state, batch) -> metrics``, with the module in eval mode; made by :func:`make_eval_step`."""

    kind = "eval_step"
    _train_mode = False

    def __call__(self, state: TrainState, batch: Any) -> dict:
        """Metrics on one batch (0-d tensors, including ``"loss"``)."""
        if self._direct():
            return self.core(state, batch)
        self._admit(state, batch)
        return self._run(self._fn, state, batch)

    def _check_output(self, state: Any, out: Any) -> None:
        _check_metrics(out)


class PredictStep(EvalStep):
    """``predict_step(state, batch) -> outputs``, with the module in eval mode; see :func:`make_predict_step`."""

    kind = "predict_step"

    def _check_output(self, state: Any, out: Any) -> None:
        pass


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
            setting as it is.
        new_shapes: what a batch with other shapes than the first does: ``"error"`` (default:
            a clear error, e.g. for a partial last batch) or ``"recompile"`` (at most one more
            compile, with a dynamic batch dim).
        backend: the ``torch.compile`` backend.

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(4, 2), ftrain.optim.sgd(0.1))
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     x, y = batch
        ...     logits, buffers = apply(params, buffers, x, key=key)
        ...     return nn.functional.cross_entropy(logits, y), {}, buffers
        >>> train_step = ftrain.make_train_step(loss_fn, compile=False)
        >>> new_state, metrics = train_step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
        >>> int(new_state.step), sorted(metrics)
        (1, ['loss'])
    """
    _check_loss_fn(loss_fn, "make_train_step")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"make_train_step: accumulate must be an int >= 1, got {accumulate!r}")
    if mesh is not None and not callable(getattr(mesh, "pmean", None)):
        raise TypeError(f"make_train_step: mesh must be an ftrain.Mesh (with .pmean), got {type(mesh).__name__}")
    core = _train_core(loss_fn, Policy.coerce(precision), accumulate, mesh)
    return TrainStep(core, compile=compile, deterministic=deterministic, new_shapes=new_shapes, backend=backend)


def make_eval_step(
    loss_fn: LossFn,
    *,
    compile: bool = True,
    precision: Policy | str | None = None,
    deterministic: bool = True,
    new_shapes: NewShapes = "recompile",
    backend: str | Callable = "inductor",
) -> EvalStep:
    """Build ``eval_step(state, batch) -> metrics`` from the same ``loss_fn`` as the train step.

    The module runs in eval mode (dropout off, BatchNorm uses running stats); buffers returned
    by ``loss_fn`` are discarded. Metrics are the loss_fn's metrics plus ``"loss"``. A batch of
    another size (the last, partial one) compiles once more by default (``new_shapes``).

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(4, 1), ftrain.optim.identity())
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     return apply(params, buffers, batch)[0].square().mean()
        >>> eval_step = ftrain.make_eval_step(loss_fn, compile=False)
        >>> sorted(eval_step(state, torch.ones(3, 4)))
        ['loss']
    """
    _check_loss_fn(loss_fn, "make_eval_step")
    core = _eval_core(loss_fn, Policy.coerce(precision))
    return EvalStep(core, compile=compile, deterministic=deterministic, new_shapes=new_shapes, backend=backend)


def make_predict_step(
    predict_fn: LossFn | None = None,
    *,
    compile: bool = True,
    precision: Policy | str | None = None,
    deterministic: bool = True,
    new_shapes: NewShapes = "recompile",
    backend: str | Callable = "inductor",
) -> PredictStep:
    """Build ``predict_step(state, batch) -> outputs`` (module in eval mode).

    ``predict_fn(apply, params, buffers, batch, key)`` returns the outputs; by default the
    model is applied to the batch (or to ``batch[0]`` when the batch is a tuple/list such as
    ``(x, y)``) and its output returned.

    Example:
        >>> import torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(4, 3), ftrain.optim.identity())
        >>> predict_step = ftrain.make_predict_step(compile=False)
        >>> predict_step(state, torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """
    if predict_fn is None:
        predict_fn = _default_predict
    _check_loss_fn(predict_fn, "make_predict_step")
    core = _predict_core(predict_fn, Policy.coerce(precision))
    return PredictStep(core, compile=compile, deterministic=deterministic, new_shapes=new_shapes, backend=backend)


def compile_step(
    fn: Callable[[Any, Any], tuple[Any, dict]],
    *,
    compile: bool = True,
    deterministic: bool = True,
    new_shapes: NewShapes = "error",
    backend: str | Callable = "inductor",
) -> TrainStep:
    """Compile your own pure ``fn(state, batch) -> (new_state, metrics)`` as a train step.

    It gets what :func:`make_train_step` gives: one graph, the fake-tensor check before the
    first compile, ``.donate``, determinism, and the batch-shape policy. Build ``fn`` from
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
    if not callable(fn):
        raise TypeError(f"compile_step expects a function fn(state, batch) -> (state, metrics), got {_describe(fn)}")
    return TrainStep(fn, compile=compile, deterministic=deterministic, new_shapes=new_shapes, backend=backend)


# ----------------------------------------------------------------------------------------------
# Ensembles: stack N states into one for torch.func.vmap, and back.


def stack_states(states: list[TrainState]) -> TrainState:
    """Stack same-shaped states leaf by leaf into one state for ``torch.func.vmap(train_step)``.

    States built separately (different seeds, separately built optimizers) stack as long as
    their leaves match; the first state's ``apply_fn`` and ``tx`` are kept.

    Example:
        >>> import torch, ftrain
        >>> states = [ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity(),
        ...                                    key=ftrain.random.key(s)) for s in range(3)]
        >>> ftrain.stack_states(states).params["weight"].shape
        torch.Size([3, 1, 2])
    """
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state, got an empty list")
    flat = [tree.flatten_with_path(s) for s in states]
    paths0, leaves0, spec = flat[0]
    for i, (paths, leaves, _) in enumerate(flat[1:], start=1):
        if paths != paths0:
            raise ValueError(f"stack_states: states[{i}] has leaves {paths} but states[0] has {paths0}")
        for path, a, b in zip(paths, leaves0, leaves):
            if _describe(a) != _describe(b):
                raise ValueError(
                    f"stack_states: states[{i}].{path} is {_describe(b)} but states[0].{path} is {_describe(a)}"
                )
    stacked = [torch.stack([f[1][j] for f in flat]) for j in range(len(leaves0))]
    return tree.unflatten(spec, stacked)


def vmap_step(step: Callable[[Any, Any], Any], *, randomness: str = "error") -> Callable[[Any, Any], Any]:
    """``torch.func.vmap`` of a step over a stacked state and a stacked batch (an ensemble).

    Non-tensor leaves of the state (an optimizer's ``None`` placeholders) are passed through
    unbatched, which plain ``torch.func.vmap(train_step)`` cannot do. Keyed dropout needs no
    ``randomness`` flag (each member draws from its own key); use ``randomness="different"``
    only for a model that calls torch's global RNG. Wrap the result in :func:`compile_step` to
    compile the whole ensemble step as one graph.

    Example:
        >>> import torch, ftrain
        >>> def loss_fn(apply, params, buffers, batch, key):
        ...     return apply(params, buffers, batch)[0].square().mean()
        >>> states = [ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1),
        ...                                    key=ftrain.random.key(s)) for s in range(4)]
        >>> step = ftrain.vmap_step(ftrain.make_train_step(loss_fn, compile=False))
        >>> ensemble, metrics = step(ftrain.stack_states(states), torch.ones(4, 8, 2))
        >>> metrics["loss"].shape
        torch.Size([4])
    """

    def dims(tree_: Any) -> Any:
        return torch_pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, tree_)

    def ensemble_step(state: Any, batch: Any) -> Any:
        state_dims = dims(state)
        batched = torch.func.vmap(step, in_dims=(state_dims, 0), out_dims=(state_dims, 0), randomness=randomness)
        return batched(state, batch)

    return ensemble_step


def unstack_state(state: TrainState) -> list[TrainState]:
    """Split a stacked state (from :func:`stack_states`) back into a list of states.

    Example:
        >>> import torch, ftrain
        >>> s = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
        >>> len(ftrain.unstack_state(ftrain.stack_states([s, s])))
        2
    """
    _check_alive(state)
    return tree.unstack(state)


# ----------------------------------------------------------------------------------------------
# Donation bookkeeping.


class _Donated:
    """What a donated state's fields hold: every use raises :class:`DonatedStateError`."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise DonatedStateError(
            "this TrainState was donated to train_step.donate(...): its tensors now hold the next state. "
            "Use the state that call returned, or call train_step(state, batch) (pure) to keep the input"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # introspection (copy, pickle, doctest) probes dunders: not a use
            raise AttributeError(name)
        return self._fail()

    __getitem__ = __iter__ = __len__ = __bool__ = __int__ = __float__ = __index__ = _fail
    __add__ = __mul__ = __sub__ = __truediv__ = __eq__ = __array__ = _fail
    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return cls._fail(None)

    def __repr__(self) -> str:
        return "<donated>"


_DONATED = _Donated()
_TRUSTED: weakref.WeakSet = weakref.WeakSet()  # states returned by .donate: known not to alias


_LEAF_FIELDS: dict[type, dict[str, _Donated]] = {}  # per state class: its non-static fields -> _DONATED


def _hand_over(state: Any) -> Any:
    """A new state object holding ``state``'s (now updated) tensors; ``state`` itself is poisoned."""
    if not (dataclasses.is_dataclass(state) and hasattr(state, "__dict__")):
        leaves, spec = tree.flatten(state)
        return tree.unflatten(spec, leaves)
    poison = _LEAF_FIELDS.get(type(state))
    if poison is None:
        fields = (f.name for f in dataclasses.fields(state) if not f.metadata.get("static"))
        poison = _LEAF_FIELDS[type(state)] = dict.fromkeys(fields, _DONATED)
    # (A shallow copy: the fields' containers are shared, and only the new object can reach them.)
    new_state = object.__new__(type(state))
    new_state.__dict__.update(state.__dict__)
    state.__dict__.update(poison)
    return new_state


def _check_alive(state: Any) -> None:
    if isinstance(state, TrainState) and type(state.__dict__.get("step")) is _Donated:
        _DONATED._fail()


def _check_no_aliasing(state: Any) -> None:
    seen: dict[int, str] = {}
    paths, leaves, _ = tree.flatten_with_path(state)
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor):
            continue
        x = getattr(x, "_local_tensor", x)  # a DTensor's memory is its local shard
        if x.numel() == 0:
            continue
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            raise StepError(
                f"cannot donate this state: state.{path} shares memory with state.{seen[ptr]}, so writing the new "
                "values in place would corrupt one of them; clone one (tree.map(torch.clone, ...)) or use the pure "
                "train_step(state, batch)"
            )
        seen[ptr] = path


def _donating(core: Callable) -> Callable:
    def donating_step(state: Any, batch: Any) -> tuple[None, dict]:
        new_state, metrics = core(state, batch)
        # copy_ inside the compiled region lets inductor write results straight into the inputs.
        # (torch's pytree here: dynamo cannot trace optree's flattening of a whole state.)
        for old, new in zip(torch_pytree.tree_leaves(state), torch_pytree.tree_leaves(new_state)):
            if isinstance(old, torch.Tensor):
                old.copy_(new)
        return None, metrics

    def run(state: Any, batch: Any) -> dict:
        return donating_step(state, batch)[1]

    return run


# ----------------------------------------------------------------------------------------------
# Small helpers.


class _CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is asked to compile."""

    def __init__(self, backend: str | Callable):
        self.inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        self.count += 1
        return self.inner(gm, example_inputs, **kwargs)


def _device_type(params: dict) -> str:
    for p in params.values():
        return p.device.type
    return "cpu"


def _split_batch(batch: Any, n: int) -> list[Any]:
    paths, leaves, spec = tree.flatten_with_path(batch)
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % n:
            raise StepError(
                f"accumulate={n} splits every batch leaf along dim 0 into {n} equal micro-batches, but "
                f"batch{'' if path == '<root>' else path} is {_describe(x)}; use a batch size divisible by {n}"
            )
    chunks = [x.chunk(n) for x in leaves]
    return [tree.unflatten(spec, [c[i] for c in chunks]) for i in range(n)]


def _metric_dict(metrics: dict) -> dict:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in metrics.items()}


def _check_scalar(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise StepError(f"loss_fn returned a {type(x).__name__} as {name}; it must be a 0-d tensor")
    if x.dim() != 0:
        raise StepError(
            f"loss_fn returned a {name} of shape {tuple(x.shape)}; it must be a scalar (0-d tensor): "
            "reduce it, e.g. loss.mean()"
        )


def _check_loss(loss: Any, metrics: dict, buffers: dict, new_buffers: Any) -> None:
    _check_scalar("loss", loss)
    if not loss.is_floating_point():
        raise StepError(f"loss_fn returned a loss of dtype {loss.dtype}; it must be a floating-point tensor")
    if not loss.requires_grad:
        raise StepError(
            "the loss does not depend on the params (it is not differentiable w.r.t. them), so every gradient "
            "would be zero: compute it from apply(params, ...) with the params loss_fn receives, without "
            ".detach(), .item(), argmax or integer ops on the path"
        )
    _check_metrics(metrics)
    if not isinstance(new_buffers, dict):
        raise StepError(
            f"loss_fn returned new_buffers as a {type(new_buffers).__name__}; it must be the dict apply returned"
        )
    if set(new_buffers) != set(buffers):
        raise StepError(
            f"loss_fn returned buffers with names {sorted(new_buffers)} but the state has {sorted(buffers)}; "
            "return the new_buffers that apply(...) gave you"
        )


def _check_metrics(metrics: Any, scalar: bool = True) -> None:
    if not isinstance(metrics, Mapping):
        raise StepError(f"metrics must be a dict of scalars, got {_describe(metrics)}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise StepError(f"metric names must be strings, got {name!r}")
        if scalar and isinstance(value, torch.Tensor) and value.dim() != 0:
            raise StepError(
                f"metric {name!r} has shape {tuple(value.shape)}; metrics must be scalars (0-d tensors): reduce it, "
                "e.g. .mean()"
            )
        if not isinstance(value, (torch.Tensor, int, float)):
            raise StepError(f"metric {name!r} is a {type(value).__name__}; metrics must be 0-d tensors")


def _check_loss_fn(fn: Any, where: str) -> None:
    if not callable(fn):
        raise TypeError(f"{where} expects a function loss_fn(apply, params, buffers, batch, key), got {_describe(fn)}")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, (tuple, list)) and len(x) <= 8:
        inner = ", ".join(_describe(v) for v in x)
        return f"({inner})" if isinstance(x, tuple) else f"[{inner}]"
    if isinstance(x, dict) and len(x) <= 8:
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


_TORCH_DIR = os.path.dirname(torch.__file__)
_FTRAIN_DIR = os.path.dirname(os.path.dirname(__file__))


def _user_frame(e: BaseException) -> str:
    """`` (at file:line in fn)`` for the innermost frame of ``e`` that is user code."""
    tb, found = e.__traceback__, None
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith((_TORCH_DIR, _FTRAIN_DIR)) and "/contextlib.py" not in path:
            found = tb
        tb = tb.tb_next
    if found is None:
        return ""
    code = found.tb_frame.f_code
    return f"\n  at {code.co_filename}:{found.tb_lineno} in {code.co_name}"


def _eager_error(core: Callable, state: Any, batch: Any) -> BaseException | None:
    try:
        core(state, batch)
    except Exception as e:
        return e
    return None
