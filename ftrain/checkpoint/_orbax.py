"""The single-process checkpoint backend: :class:`CheckpointManager`, on orbax-checkpoint.

:class:`CheckpointManager` saves every leaf of a state (params, buffers, optimizer state, step,
key, fields a subclass adds) by its tree path, with the data position and JSON metadata, into
step directories written by orbax's ``CheckpointManager``: asynchronous by default and atomic (a
step is either complete or invisible). Which steps are kept (the last ``keep`` and the best
``keep_best``), the metadata and the template checks are the shared policy
(:class:`ftrain.checkpoint.CheckpointPolicy`); this module stores the bytes.

orbax (and jax) are imported on first use, not by ``import ftrain``.

Example:
    >>> import tempfile, torch, ftrain
    >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
    >>> with ftrain.CheckpointManager(tempfile.mkdtemp(), async_save=False) as manager:
    ...     manager.save(state, data={"epoch": 0, "batch": 3})
    ...     template = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
    ...     restored, extras = manager.restore_latest(template)
    True
    >>> ftrain.tree.equal(restored.params, state.params), extras["data"]
    (True, {'epoch': 0, 'batch': 3})
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import tree
from ._policy import CheckpointCorruptedError, CheckpointPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._policy import PolicyOptions

__all__ = ["CheckpointManager"]

# Leaves at least this big and of a dtype jax holds natively are handed to orbax as zero-copy
# jax arrays: orbax then writes them from our memory without its own copy (about 5x faster than
# numpy leaves, and an async save blocks only for the staging copy: docs/concepts/checkpoints.md).
_ZERO_COPY_MIN_BYTES = 1 << 16
_ZERO_COPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- dtype bridge


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s bits (``ml_dtypes`` for bf16 and float8)."""
    special = _ml_dtypes_table()
    if dtype in special:
        return np.dtype(special[dtype])
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError as e:
        raise TypeError(f"checkpoint: leaves of dtype {dtype} cannot be saved (no numpy equivalent)") from e


def _ml_dtypes_table() -> dict[torch.dtype, Any]:
    import ml_dtypes

    table = {torch.bfloat16: ml_dtypes.bfloat16}
    for t, m in [("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2")]:
        if hasattr(torch, t) and hasattr(ml_dtypes, m):
            table[getattr(torch, t)] = getattr(ml_dtypes, m)
    return table


def _same_width_int(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; dtypes numpy lacks go through a same-width int view (bit-exact)."""
    special = _ml_dtypes_table()
    if t.dtype in special:
        return t.view(_same_width_int(t.dtype)).numpy().view(special[t.dtype])
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    a = np.require(a, requirements="C")  # not ascontiguousarray: it turns 0-d arrays into 1-d ones
    if dtype in _ml_dtypes_table():
        return torch.from_numpy(a.view(_np_dtype(_same_width_int(dtype)))).view(dtype)
    return torch.from_numpy(a)


# ----------------------------------------------------------------------------- the manager


class CheckpointManager(CheckpointPolicy):
    """Save and restore whole training states in ``directory``, on orbax's ``CheckpointManager``.

    Every step lives in its own sub-directory named by the step number, written
    atomically (a half-written step stays a hidden ``*.orbax-checkpoint-tmp``
    directory and is never restored). What a step holds: every leaf of the
    state by its tree path, the data position (``save(..., data=...)``), the
    metrics it was saved with, the run ``config``, the ftrain/torch versions and
    a fingerprint of the state's structure.

    Args:
        directory: where the steps live (created if missing).
        save_every: :meth:`should_save` is true every this many steps (``None``:
            never; :meth:`save` then saves whenever called).
        keep: keep the latest this many steps (``None``: keep all).
        best: a metric name passed in ``save(..., metrics=...)``, e.g.
            ``"val/loss"``; the best ``keep_best`` steps by it are kept as well.
            A step saved without it ranks last (kept only while among the latest).
        mode: ``"min"`` or ``"max"``: which way ``best`` is better.
        keep_best: how many of the best steps to keep.
        async_save: write in a background thread; :meth:`save` returns once the
            state is staged (see ``copy``).
        config: the run's configuration / hyperparameters (JSON-able dict),
            stored with every step; a directory whose steps carry a different
            config is refused as another run's.
        copy: stage a copy of the state before an async write, so the training
            loop may overwrite the state's memory (a donating step does) while
            the write runs. ``False`` saves from the state's memory directly:
            only safe when nothing writes into those tensors until
            :meth:`wait`.
        compress: zstd-compress the arrays (smaller files, slower save/restore).
        primary: whether this process writes. Defaults to rank 0 of
            ``torch.distributed`` (every process when not distributed); the
            other processes only read, for a state replicated on every rank.

    Example:
        >>> import tempfile, torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> manager = ftrain.CheckpointManager(tempfile.mkdtemp(), save_every=100, keep=2)
        >>> manager.should_save(100), manager.should_save(150)
        (True, False)
        >>> manager.save(state, force=True)
        True
        >>> manager.wait(); manager.latest_step()
        0
        >>> manager.close()
    """

    _packages = ("orbax-checkpoint",)

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        copy: bool = True,
        compress: bool = False,
        primary: bool | None = None,
        **policy: Unpack[PolicyOptions],
    ):
        super().__init__(directory, **policy)
        self.copy = copy
        self.compress = compress
        if primary is None:
            primary = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
                torch.distributed.get_rank() == 0
            )
        self.primary = self._writes = self._owns_files = primary  # the others only read
        self._staging: dict[str, torch.Tensor] = {}
        self._manager = self._make_manager()

    @property
    def copies_state(self) -> bool:
        """True when :meth:`save` never reads the state's memory after it returns.

        Then a donating loop may overwrite the state right away without copying it first.
        """
        return self.copy or not self.async_save

    def _make_manager(self) -> Any:
        import orbax.checkpoint as ocp

        if not self.primary and not self.directory.is_dir():
            raise FileNotFoundError(
                f"CheckpointManager: {self.directory} does not exist; on a non-primary process the manager only "
                "reads, so the primary process (rank 0) must create it first (build its manager before a barrier)"
            )
        options = ocp.CheckpointManagerOptions(
            # orbax keeps every step: the policy's rotation deletes them (one rule for both backends).
            max_to_keep=None,
            # One write path for both modes: async_save=False is the async write plus a wait in save()
            # (measured as fast as orbax's blocking checkpointer here).
            enable_async_checkpointing=True,
            cleanup_tmp_directories=self.primary,
            read_only=not self.primary,
            create=self.primary,
        )
        return ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(
                    use_compression=self.compress, type_handler_registry=_type_handlers()
                ),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    # -- the backend

    def _steps(self) -> list[int]:
        if not self.primary:
            # Another process writes: re-read the directory. (The writer must not reload while its own
            # async save is in flight: orbax would forget that step.)
            self._manager.reload()
        return list(self._manager.all_steps())

    def _read_meta(self, step: int) -> Any:
        import orbax.checkpoint as ocp

        path = self.directory / str(step) / "meta"
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointCorruptedError(
                f"checkpoint step {step}: cannot read its metadata {_file_in(e, path)}: {type(e).__name__}: {e}",
                step=step,
                path=_file_in(e, path),
            ) from e

    def _write(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        import orbax.checkpoint as ocp

        # The policy waited for the previous save, so the staging buffers it read are free again.
        # A synchronous save is written before save() returns, so it can read the state's own memory.
        arrays = self._stage(state, copy=self.copy and self.async_save)
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)), force=True
        )

    def _finish(self) -> None:
        self._manager.wait_until_finished()

    def _delete(self, step: int) -> None:
        self._manager.delete(step)

    def _close(self) -> None:
        self._manager.close()
        self._staging.clear()

    def _stage(self, state: Any, copy: bool) -> dict[str, Any]:
        """Host arrays keyed by leaf path, safe to write while the caller goes on."""
        import jax

        paths, leaves, _ = tree.flatten_with_path(state)
        arrays: dict[str, Any] = {}
        live = set()
        for path, leaf in zip(paths, leaves):
            if not isinstance(leaf, torch.Tensor):
                continue
            t = leaf.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")  # already a fresh copy
            elif copy:
                buf = self._staging.get(path)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = torch.empty_like(t, memory_format=torch.contiguous_format)
                    self._staging[path] = buf
                buf.copy_(t)
                live.add(path)
                t = buf
            t = t.contiguous()
            if t.dtype in _ZERO_COPY_DTYPES and t.numel() * t.element_size() >= _ZERO_COPY_MIN_BYTES:
                arrays[path] = jax.dlpack.from_dlpack(t)
            else:
                # numpy leaves are copied: jax would narrow int64/float64 without x64 mode.
                arrays[path] = _to_numpy(t).copy()
        for path in set(self._staging) - live:
            del self._staging[path]
        return arrays

    def _load(self, step: int, template: Any, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        import orbax.checkpoint as ocp

        saved = meta["tensors"]
        restore_args = {
            p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=_np_dtype(getattr(torch, d["dtype"])))
            for p, d in saved.items()
        }
        item = self.directory / str(step) / "state"
        try:
            arrays = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args))
            ).state
        except Exception as e:
            raise CheckpointCorruptedError(
                f"checkpoint step {step} is corrupted or truncated: reading {_file_in(e, item)} failed: "
                f"{type(e).__name__}: {_first_line(e)}",
                step=step,
                path=_file_in(e, item),
            ) from e
        out = {}
        paths, leaves, _ = tree.flatten_with_path(template)
        for path, leaf in zip(paths, leaves):
            if isinstance(leaf, torch.Tensor):
                a = arrays.get(path) if isinstance(arrays, dict) else None
                if a is None or list(a.shape) != saved[path]["shape"]:
                    got = "nothing" if a is None else f"shape {tuple(a.shape)}"
                    raise CheckpointCorruptedError(
                        f"checkpoint step {step} is corrupted: {path} should be {tuple(saved[path]['shape'])} "
                        f"but {item} gave {got}",
                        step=step,
                        path=str(item),
                    )
                out[path] = _from_numpy(a, leaf.dtype).to(leaf.device)
        return out


def _type_handlers() -> Any:
    """orbax's default type handlers, with numpy arrays read through memory-mapped files.

    The default reads each file into a buffer and then copies it into the array; mapping the file
    saves a copy: restore went from ~2.3x to ~1.15x the time of ``torch.load`` (1 GB,
    benchmarks/checkpoint_io.py). The arrays still get their own (anonymous, writable) memory.
    """
    from orbax.checkpoint import type_handlers

    class MemmapNumpyHandler(type_handlers.NumpyHandler):
        async def deserialize(self, infos, args=None):  # type: ignore[override]
            try:
                infos = [_memmapped(info) for info in infos]
            except (AttributeError, TypeError, ValueError):  # an orbax whose infos differ: its own reads (slower)
                pass
            return await super().deserialize(infos, args)

    import jax

    # What _stage hands orbax: jax arrays (zero-copy leaves) and numpy arrays; scalars for safety.
    defaults = [(ty, type_handlers.get_type_handler(ty)) for ty in (jax.Array, int, float, np.number)]
    return type_handlers.create_type_handler_registry(*defaults, (np.ndarray, MemmapNumpyHandler()))


def _memmapped(info: Any) -> Any:
    """A copy of orbax's read info for one array, asking tensorstore to map the file (orbax internals)."""
    import copy

    import tensorstore as ts

    info = copy.copy(info)
    spec = info.ts_context.spec.to_json() if info.ts_context is not None else {}
    info.ts_context = ts.Context({**spec, "file_io_mode": {"mode": "memmap"}})
    return info


def _file_in(error: BaseException, default: Path) -> str:
    """The checkpoint file an orbax/tensorstore error names, else ``default``."""
    text = str(error)
    for cause in (error.__cause__, error.__context__):
        if cause is not None:
            text += " " + str(cause)
    found = re.findall(r"(/[^\s\"'\]\)]+)", text)
    return next((f for f in found if f.startswith(str(default.parent))), str(default))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""
