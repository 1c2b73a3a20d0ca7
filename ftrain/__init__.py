"""ftrain: a functional, JAX-style training loop for PyTorch.

State is data (:class:`TrainState`), steps are pure compiled functions, and the
loop is thin. See ``docs/`` for the concepts and a migration guide.
"""

from . import actions as actions
from . import checkpoint as checkpoint
from . import config as config
from . import data as data
from . import datasets as datasets
from . import loop as loop
from . import mesh as mesh
from . import metrics as metrics
from . import optim as optim
from . import precision as precision
from . import random as random
from . import schedules as schedules
from . import sweep as sweep
from . import tree as tree
from . import writers as writers
from ._module import ModuleApply as ModuleApply
from ._run import Preempted as Preempted
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
from ._step import vmap_step as vmap_step
from ._summary import ModuleSummary as ModuleSummary
from ._summary import Summary as Summary
from ._summary import summary as summary
from ._tuning import LRFindResult as LRFindResult
from ._tuning import find_batch_size as find_batch_size
from ._tuning import lr_find as lr_find
from ._version import VERSION as __version__  # noqa: F401 (the public version attribute)
from .checkpoint import CheckpointManager as CheckpointManager
from .checkpoint import ShardedCheckpointManager as ShardedCheckpointManager
from .loop import evaluate as evaluate
from .loop import fast_dev_run as fast_dev_run
from .loop import fit as fit
from .loop import limit_batches as limit_batches
from .loop import overfit_batches as overfit_batches
from .loop import predict as predict
from .mesh import Mesh as Mesh
