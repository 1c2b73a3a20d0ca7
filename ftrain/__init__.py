"""ftrain: a functional, JAX-style training loop for PyTorch.

State is data (:class:`TrainState`), steps are pure compiled functions, and the
loop is thin. See ``docs/`` for the concepts and a migration guide.
"""

from . import checkpoint as checkpoint
from . import data as data
from . import optim as optim
from . import precision as precision
from . import random as random
from . import schedules as schedules
from . import tree as tree
from ._module import ModuleApply as ModuleApply
from ._state import ImmutableStateError as ImmutableStateError
from ._state import TrainState as TrainState
from ._state import static_field as static_field
from ._step import DonatedStateError as DonatedStateError
from ._step import EvalStep as EvalStep
from ._step import PredictStep as PredictStep
from ._step import StepError as StepError
from ._step import TrainStep as TrainStep
from ._step import compile_step as compile_step
from ._step import loss_and_grad as loss_and_grad
from ._step import make_eval_step as make_eval_step
from ._step import make_predict_step as make_predict_step
from ._step import make_train_step as make_train_step
from ._step import stack_states as stack_states
from ._step import step_key as step_key
from ._step import unstack_state as unstack_state
from .checkpoint import CheckpointManager as CheckpointManager

__version__ = "0.1.0"
