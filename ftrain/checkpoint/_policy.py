"""What every checkpoint manager promises the loop: the :class:`Checkpointer` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Checkpointer"]


@runtime_checkable
class Checkpointer(Protocol):
    """The interface :func:`ftrain.fit` and :class:`ftrain.actions.Checkpoint` use.

    :class:`ftrain.CheckpointManager` and :class:`ftrain.ShardedCheckpointManager` implement it;
    so may your own manager.

    ``copies_state`` says whether :meth:`save` stages its own copy of the state before it returns
    (so a donating step may overwrite the state's memory while a write is still under way); when
    false, the loop hands a donated state over as a copy.
    """

    copies_state: bool

    def should_save(self, step: int) -> bool:
        """Whether the manager's schedule asks for a save after ``step``."""
        ...

    def save(
        self,
        state: Any,
        *,
        data: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` (at ``int(state.step)``) with the data position and metrics; whether it saved."""
        ...

    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]] | None:
        """The latest saved state, restored into ``template``'s structure, and its extras; None if none."""
        ...

    def wait(self) -> None:
        """Block until every save under way is durable."""
        ...

    def close(self) -> None:
        """Finish saves under way and release resources."""
        ...
