"""Pure train, eval and predict steps, compiled whole with ``torch.compile``."""

from ._core import DonatedStateError as DonatedStateError
from ._core import EvalStep as EvalStep
from ._core import PredictStep as PredictStep
from ._core import StepError as StepError
from ._core import TrainStep as TrainStep
from ._core import compile_step as compile_step
from ._core import loss_and_grad as loss_and_grad
from ._core import make_eval_step as make_eval_step
from ._core import make_predict_step as make_predict_step
from ._core import make_train_step as make_train_step
from ._core import split_loss_output as split_loss_output
from ._core import stack_states as stack_states
from ._core import step_key as step_key
from ._core import unstack_state as unstack_state
from ._core import vmap_step as vmap_step

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
