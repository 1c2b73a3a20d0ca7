"""Optimizers in optax's shape with torch.optim's numbers.

An optimizer is a :class:`GradientTransformation`: a pair of pure functions
``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``.
Named optimizers are chains of small building blocks.
"""

from ._base import EmptyState as EmptyState
from ._base import GradientTransformation as GradientTransformation
from ._base import apply_updates as apply_updates
from ._base import chain as chain
from ._base import identity as identity
