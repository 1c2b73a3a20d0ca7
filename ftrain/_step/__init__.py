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

The parts, one concern each: ``_grad`` (the pure pieces: key, loss and gradients, the cores),
``_compiled`` (the step objects around a compiled core), ``_donate`` (``train_step.donate``),
``_checks`` (the errors and what a step checks), ``_ensemble`` (stacked states for ``vmap``)
and ``_make`` (the public builders).
"""

from ._checks import DonatedStateError as DonatedStateError
from ._checks import StepError as StepError
from ._compiled import EvalStep as EvalStep
from ._compiled import PredictStep as PredictStep
from ._compiled import TrainStep as TrainStep
from ._ensemble import stack_states as stack_states
from ._ensemble import unstack_state as unstack_state
from ._ensemble import vmap_step as vmap_step
from ._grad import loss_and_grad as loss_and_grad
from ._grad import split_loss_output as split_loss_output
from ._grad import step_key as step_key
from ._make import compile_step as compile_step
from ._make import make_eval_step as make_eval_step
from ._make import make_predict_step as make_predict_step
from ._make import make_train_step as make_train_step

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
