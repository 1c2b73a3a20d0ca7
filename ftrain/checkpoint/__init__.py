"""Checkpoints: save and restore a state, async and atomic, with keep-last and keep-best rotation.

One policy over two storage backends. :class:`CheckpointPolicy` holds what every manager does
alike (the schedule, rotation, metadata and its format version, template checks, errors);
:class:`CheckpointManager` stores a single process's state with orbax-checkpoint, and
:class:`ShardedCheckpointManager` a state placed on a :class:`ftrain.Mesh` (every rank writes its
shards) with ``torch.distributed.checkpoint``. Both resume a run exactly. :class:`Checkpointer`
is the protocol the loop uses; :func:`state_dict` and :func:`save_safetensors` export the weights.
"""

from ._dcp import ShardedCheckpointManager as ShardedCheckpointManager
from ._export import load_safetensors as load_safetensors
from ._export import save_safetensors as save_safetensors
from ._export import state_dict as state_dict
from ._orbax import CheckpointManager as CheckpointManager
from ._policy import PREEMPTION_SIGNALS as PREEMPTION_SIGNALS
from ._policy import CheckpointCorruptedError as CheckpointCorruptedError
from ._policy import Checkpointer as Checkpointer
from ._policy import CheckpointError as CheckpointError
from ._policy import CheckpointMismatchError as CheckpointMismatchError
from ._policy import CheckpointPolicy as CheckpointPolicy

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "Checkpointer",
    "PREEMPTION_SIGNALS",
    "ShardedCheckpointManager",
    "load_safetensors",
    "save_safetensors",
    "state_dict",
]
