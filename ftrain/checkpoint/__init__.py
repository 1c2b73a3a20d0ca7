"""Checkpoints: save and restore a state, async and atomic, with keep-last and keep-best rotation.

:class:`CheckpointManager` stores a single process's state with orbax-checkpoint;
:class:`ShardedCheckpointManager` stores a state placed on a :class:`ftrain.Mesh`
(every rank writes its shards) with ``torch.distributed.checkpoint``. Both resume
a run exactly. :func:`state_dict` and :func:`save_safetensors` export the weights.
"""

from ._dcp import ShardedCheckpointManager as ShardedCheckpointManager
from ._policy import Checkpointer as Checkpointer
from ._orbax import CheckpointCorruptedError as CheckpointCorruptedError
from ._orbax import CheckpointError as CheckpointError
from ._orbax import CheckpointManager as CheckpointManager
from ._orbax import CheckpointMismatchError as CheckpointMismatchError
from ._orbax import load_safetensors as load_safetensors
from ._orbax import save_safetensors as save_safetensors
from ._orbax import state_dict as state_dict

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "Checkpointer",
    "ShardedCheckpointManager",
    "load_safetensors",
    "save_safetensors",
    "state_dict",
]
