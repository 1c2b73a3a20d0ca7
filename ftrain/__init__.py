"""ftrain: a functional, JAX-style training loop for PyTorch.

State is data (:class:`TrainState`), steps are pure compiled functions, and the
loop is thin. See ``docs/`` for the concepts and a migration guide.
"""

from . import checkpoint as checkpoint
from . import data as data
from . import mesh as mesh
from . import optim as optim
from . import random as random
from . import schedules as schedules
from . import tree as tree
from ._module import ModuleApply as ModuleApply
from ._state import ImmutableStateError as ImmutableStateError
from ._state import TrainState as TrainState
from ._state import static_field as static_field
from .checkpoint import CheckpointManager as CheckpointManager
from .mesh import Mesh as Mesh
from .mesh import ShardedCheckpointManager as ShardedCheckpointManager

__version__ = "0.1.0"
