"""Checkpoints of a whole training state on orbax-checkpoint, and export helpers.

:class:`CheckpointManager` saves every leaf of a state (params, buffers,
optimizer state, step, key, fields a subclass adds) by its tree path, with the
data position and JSON metadata, into step directories managed by orbax's
``CheckpointManager``: asynchronous by default, atomic (a step is either
complete or invisible), keeping the last ``keep`` steps and the best
``keep_best`` by a monitored metric. Restoring maps everything back onto a
template state: its structure, dtypes, devices and static fields.

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

import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tree

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "load_safetensors",
    "save_safetensors",
    "state_dict",
]

FORMAT = "ftrain-checkpoint"
FORMAT_VERSION = 1

# Leaves at least this big and of a dtype jax holds natively are handed to orbax as zero-copy
# jax arrays: orbax then writes them from our memory without its own copy (FINDINGS.md: ~5x
# faster than numpy leaves, and an async save blocks only for the staging copy).
_ZERO_COPY_MIN_BYTES = 1 << 16
_ZERO_COPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(RuntimeError):
    """Base class of the checkpoint errors."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint step that cannot be read back (truncated, corrupted or half-deleted files).

    ``step`` is the step and ``path`` the file or directory that failed.
    """

    def __init__(self, message: str, *, step: int, path: str):
        super().__init__(message)
        self.step = step
        self.path = path


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint that does not belong to the template or run it is restored into or saved beside."""


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- state <-> table


def _describe(state: Any) -> tuple[dict[str, dict], dict[str, Any], list[str]]:
    """``(tensors, scalars, order)``: per-path shape/dtype of tensor leaves, values of the other leaves."""
    paths, leaves, _ = tree.flatten_with_path(state)
    tensors: dict[str, dict] = {}
    scalars: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[path] = {"shape": list(leaf.shape), "dtype": _dtype_name(leaf.dtype)}
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            scalars[path] = leaf
        else:
            raise TypeError(
                f"checkpoint: the leaf at {path} is a {type(leaf).__name__}; a checkpointed state holds tensors "
                "and Python scalars (int, float, bool, str, None) only. Make it a tensor or a static field"
            )
    return tensors, scalars, list(paths)


def _fingerprint(tensors: Mapping[str, dict], scalars: Mapping[str, Any]) -> str:
    table = [[p, d["shape"], d["dtype"]] for p, d in tensors.items()] + [[p, "scalar"] for p in scalars]
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16]


def _fmt(spec: Any) -> str:
    return spec if spec == "scalar" else f"{tuple(spec[0])} {spec[1]}"


def _short(items: list[str], limit: int = 10, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"CheckpointManager.save: metric {name!r} must be a scalar, got shape {tuple(value.shape)}"
            )
        return float(value.item())  # a host sync, once per save
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"CheckpointManager.save: metric {name!r} must be a number or 0-d tensor, got {type(value).__name__}"
    )


# ----------------------------------------------------------------------------- the manager


class CheckpointManager:
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

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int | None = None,
        keep: int | None = 3,
        best: str | None = None,
        mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
        config: Mapping[str, Any] | None = None,
        copy: bool = True,
        compress: bool = False,
        primary: bool | None = None,
    ):
        if save_every is not None and (
            isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1
        ):
            raise ValueError(f"CheckpointManager: save_every must be a positive int or None, got {save_every!r}")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"CheckpointManager: keep must be a positive int or None (keep all), got {keep!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"CheckpointManager: mode must be 'min' or 'max', got {mode!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"CheckpointManager: keep_best must be a positive int, got {keep_best!r}")
        if best is not None and not isinstance(best, str):
            raise TypeError(f"CheckpointManager: best must be a metric name (str) or None, got {type(best).__name__}")
        if config is not None:
            try:
                config = json.loads(json.dumps(dict(config)))
            except (TypeError, ValueError) as e:
                raise TypeError(f"CheckpointManager: config must be a JSON-able dict, got {config!r} ({e})") from e
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self.keep = keep
        self.best = best
        self.mode = mode
        self.keep_best = keep_best
        self.async_save = async_save
        self.config = config
        self.copy = copy
        self.compress = compress
        if primary is None:
            primary = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
                torch.distributed.get_rank() == 0
            )
        self.primary = primary
        self._staging: dict[str, torch.Tensor] = {}
        self._checked_dir = False
        self._manager = self._make_manager()

    # -- orbax plumbing

    def _make_manager(self) -> Any:
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        keep_policies: list[Any] = [policies.LatestN(n=self.keep)]
        if self.best is not None:
            best = self.best
            # A step saved without this metric (e.g. under another `best`) ranks last.
            worst = float("inf") if self.mode == "min" else float("-inf")
            keep_policies.append(
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics.get(best, worst),
                    # BestN keeps the top of an ascending sort: reverse it when lower is better.
                    reverse=self.mode == "min",
                    n=self.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        if not self.primary and not self.directory.is_dir():
            raise FileNotFoundError(
                f"CheckpointManager: {self.directory} does not exist; on a non-primary process the manager only "
                "reads, so the primary process (rank 0) must create it first (build its manager before a barrier)"
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn only makes orbax read the saved metrics back; BestN above decides what is kept.
            best_fn=(lambda metrics: metrics.get(best, worst)) if self.best is not None else None,
            best_mode=self.mode,
            # One write path for both modes: async_save=False is the async write plus a wait in save()
            # (measured as fast as orbax's blocking checkpointer here).
            enable_async_checkpointing=True,
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
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

    # -- queries

    def all_steps(self) -> list[int]:
        """The complete steps in the directory, ascending (a half-written step is not listed)."""
        if not self.primary:
            # Another process writes: re-read the directory. (The writer must not reload while its own
            # async save is in flight: orbax would forget that step and mis-count what to keep.)
            self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when the directory holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``best`` metric (``None`` without ``best`` or metrics)."""
        if self.best is None:
            return None
        scored = []
        for step in self.all_steps():
            metrics = self.metadata(step).get("metrics") or {}
            if self.best in metrics:
                scored.append((metrics[self.best], step))
        if not scored:
            return None
        return (min(scored) if self.mode == "min" else max(scored))[1]

    def metadata(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with ``step``: versions, config, data position, metrics, leaf table."""
        import orbax.checkpoint as ocp

        path = self.directory / str(step) / "meta"
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointCorruptedError(
                f"checkpoint step {step}: cannot read its metadata {_file_in(e, path)}: {type(e).__name__}: {e}",
                step=step,
                path=_file_in(e, path),
            ) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{self.directory / str(step)} is not an ftrain checkpoint (its metadata has no "
                f"format={FORMAT!r}); was the directory written by another program? Use a new directory"
            )
        return meta

    @property
    def copies_state(self) -> bool:
        """True when :meth:`save` never reads the state's memory after it returns.

        Then a donating loop may overwrite the state right away without copying it first.
        """
        return self.copy or not self.async_save

    def should_save(self, step: int) -> bool:
        """Whether the schedule (``save_every``) asks for a save after ``step``."""
        return self.save_every is not None and step > 0 and step % self.save_every == 0

    # -- save

    def save(
        self,
        state: Any,
        *,
        data: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as step ``int(state.step)``; returns whether a save started.

        Skipped (``False``) when the step is already saved, when this is not the
        primary process, or when ``save_every`` is set, ``force`` is not, and
        :meth:`should_save` says no. With ``async_save`` the write goes on in the
        background; the state is staged first (see ``copy``), so the caller may
        go on using and even overwriting it.

        Args:
            state: a :class:`ftrain.TrainState` (or any pytree with a ``step``).
            data: the data position, e.g. ``loader.state_dict()`` (JSON-able).
            metrics: numbers (or 0-d tensors) saved with the step; ``best`` ranks by them.
            force: save even when the schedule says no.
        """
        step = _step_of(state)
        if not self.primary:
            return False
        if not force and self.save_every is not None and not self.should_save(step):
            return False
        if step in self.all_steps():
            return False
        tensors, scalars, order = _describe(state)
        self._check_directory(tensors, scalars, "save into")
        metrics = {str(k): _to_float(v, k) for k, v in (metrics or {}).items()}
        try:
            data = json.loads(json.dumps(data)) if data is not None else None
        except (TypeError, ValueError) as e:
            raise TypeError(f"CheckpointManager.save: data must be a JSON-able dict, got {data!r} ({e})") from e
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "state_type": f"{type(state).__module__}.{type(state).__qualname__}",
            "fingerprint": _fingerprint(tensors, scalars),
            "tensors": tensors,
            "scalars": scalars,
            "order": order,
            "data": data,
            "metrics": metrics,
            "config": self.config,
            "versions": _versions(),
            "time": time.time(),
        }
        import orbax.checkpoint as ocp

        # The staging buffers are reused from the previous save: it must be done reading them.
        self._manager.wait_until_finished()
        # A synchronous save is written before we return, so it can read the state's own memory.
        arrays = self._stage(state, copy=self.copy and self.async_save)
        best_metrics = metrics if self.best is not None and self.best in metrics else None
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)),
            metrics=best_metrics,
            force=True,
        )
        if not self.async_save:
            self._manager.wait_until_finished()
        return True

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

    def _check_directory(self, tensors: Mapping[str, dict], scalars: Mapping[str, Any], verb: str) -> None:
        """Refuse a directory whose latest step belongs to another model or run (checked once)."""
        if self._checked_dir:
            return
        latest = self.latest_step()
        if latest is not None:
            meta = self.metadata(latest)
            if meta["fingerprint"] != _fingerprint(tensors, scalars):
                raise CheckpointMismatchError(
                    f"cannot {verb} {self.directory}: its checkpoints (latest step {latest}) hold another model or "
                    f"state layout ({meta['state_type']}); "
                    + "; ".join(_differences(meta, tensors, scalars))
                    + ". Use a new directory for this run"
                )
            if self.config is not None and meta.get("config") is not None and meta["config"] != self.config:
                changed = sorted(
                    k for k in set(self.config) | set(meta["config"]) if self.config.get(k) != meta["config"].get(k)
                )
                raise CheckpointMismatchError(
                    f"cannot {verb} {self.directory}: its checkpoints (latest step {latest}) come from another run, "
                    f"whose config differs in {changed} (saved "
                    f"{ {k: meta['config'].get(k) for k in changed} }, now { {k: self.config.get(k) for k in changed} }). "
                    "Use a new directory, or pass the saved config to resume that run"
                )
        self._checked_dir = True

    # -- restore

    def restore(self, step: int | None = None, *, into: Any) -> Any:
        """The state saved at ``step`` (default: the latest), with the structure of ``into``.

        ``into`` is a template state (e.g. a freshly created one): the result has
        its tree structure, dtypes, devices and static fields (``apply_fn``,
        ``tx``); only leaf values come from the checkpoint.

        Raises:
            CheckpointMismatchError: the checkpoint's leaves differ from the
                template's (the message lists missing, unexpected and mis-shaped
                leaf paths) or the directory belongs to another run.
            CheckpointCorruptedError: the step's files cannot be read (names
                the step and the file).
            FileNotFoundError: no such step.
        """
        return self._restore(step, into)[0]

    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, extras)`` from the newest readable step, or ``None`` if the directory has none.

        ``extras`` has ``"data"`` (the data position saved with the step, or
        ``None``), ``"step"``, ``"metrics"`` and ``"config"``. A corrupted step
        is skipped with a warning and the previous one is tried.
        """
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                state, meta = self._restore(step, template)
            except CheckpointCorruptedError as e:
                errors.append(e)
                warnings.warn(f"{e}; falling back to an earlier step", RuntimeWarning, stacklevel=2)
                continue
            extras = {
                "data": meta.get("data"),
                "step": step,
                "metrics": meta.get("metrics"),
                "config": meta.get("config"),
            }
            return state, extras
        raise CheckpointCorruptedError(
            f"no readable checkpoint in {self.directory}: every step ({steps}) failed; the newest error: {errors[0]}",
            step=errors[0].step,
            path=errors[0].path,
        )

    def _restore(self, step: int | None, template: Any) -> tuple[Any, dict[str, Any]]:
        import orbax.checkpoint as ocp

        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"CheckpointManager.restore: {self.directory} holds no checkpoint")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"CheckpointManager.restore: no step {step} in {self.directory}; it holds {steps}")
        t_tensors, t_scalars, _ = _describe(template)
        meta = self.metadata(step)
        diff = _differences(meta, t_tensors, t_scalars)
        if diff:
            raise CheckpointMismatchError(
                f"cannot restore step {step} of {self.directory} into this template "
                f"({type(template).__name__}; the checkpoint holds a {meta['state_type']}): "
                + "; ".join(diff)
                + ". Build the template from the same model and optimizer as the saved run"
            )
        self._check_directory(t_tensors, t_scalars, "restore from")
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
        paths, leaves, spec = tree.flatten_with_path(template)
        out = []
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
                out.append(_from_numpy(a, leaf.dtype).to(leaf.device))
            else:
                out.append(meta["scalars"][path])
        return tree.unflatten(spec, out), meta

    # -- lifecycle

    def wait(self) -> None:
        """Block until the pending async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._staging.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, save_every={self.save_every}, keep={self.keep}, "
            f"best={self.best!r}, mode={self.mode!r}, async_save={self.async_save})"
        )


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


def _differences(meta: Mapping[str, Any], tensors: Mapping[str, dict], scalars: Mapping[str, Any]) -> list[str]:
    """Human-readable lines: leaf paths missing, unexpected or mis-shaped between a checkpoint and a template."""
    want = {**{p: (d["shape"], d["dtype"]) for p, d in tensors.items()}, **{p: "scalar" for p in scalars}}
    have = {
        **{p: (d["shape"], d["dtype"]) for p, d in meta["tensors"].items()},
        **{p: "scalar" for p in meta["scalars"]},
    }
    lines = []
    missing = [p for p in want if p not in have]
    unexpected = [p for p in have if p not in want]
    if missing:
        lines.append(f"missing in the checkpoint (the template has them): {_short(missing)}")
    if unexpected:
        lines.append(f"unexpected in the checkpoint (the template lacks them): {_short(unexpected)}")
    mis = [
        f"{p}: checkpoint {_fmt(have[p])} vs template {_fmt(want[p])}" for p in want if p in have and have[p] != want[p]
    ]
    if mis:
        lines.append("mis-shaped or mis-typed: " + _short(mis, sep="; "))
    return lines


def _step_of(state: Any) -> int:
    step = getattr(state, "step", None)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.dtype.is_floating_point:
        return int(step.item())
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    raise TypeError(
        f"CheckpointManager.save: the state must have an integer `step` (a 0-d int tensor, as ftrain.TrainState "
        f"has), got {type(state).__name__} with step={step!r}"
    )


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


def _versions() -> dict[str, str]:
    from importlib import metadata

    from .. import __version__

    versions = {"ftrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        versions["orbax-checkpoint"] = metadata.version("orbax-checkpoint")
    except metadata.PackageNotFoundError:  # pragma: no cover
        pass
    return versions


# ----------------------------------------------------------------------------- export


def state_dict(state: Any, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """The params (and buffers) of ``state`` as a plain ``nn.Module``-style state dict.

    Keys are the module's dotted names, so ``model.load_state_dict(...)`` takes
    it (the tensors are shared with the state, not copied).

    >>> import torch, ftrain
    >>> state = ftrain.TrainState.create(torch.nn.BatchNorm1d(2), ftrain.optim.sgd(0.1))
    >>> sorted(ftrain.checkpoint.state_dict(state))
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    >>> torch.nn.BatchNorm1d(2).load_state_dict(ftrain.checkpoint.state_dict(state))
    <All keys matched successfully>
    """
    params, bufs = getattr(state, "params", None), getattr(state, "buffers", None)
    if not isinstance(params, Mapping):
        raise TypeError(
            f"state_dict expects a TrainState (with a params dict), got {type(state).__name__}; for a plain dict "
            "of tensors use it as is"
        )
    out = dict(params)
    if buffers and isinstance(bufs, Mapping):
        clash = sorted(set(out) & set(bufs))
        if clash:
            raise ValueError(f"state_dict: names {clash} are both params and buffers; cannot merge them into one dict")
        out.update(bufs)
    return {k: v.detach() for k, v in out.items()}


def save_safetensors(
    state: Any, path: str | os.PathLike, *, buffers: bool = True, metadata: Mapping[str, str] | None = None
) -> None:
    """Write the params (and buffers) of ``state`` (or a dict of tensors) to a ``.safetensors`` file.

    The file loads anywhere safetensors does (``safetensors.torch.load_file``,
    Hugging Face tools) with no ftrain or pickle involved. Needs the
    ``safetensors`` package (``pip install ftrain[export]``).

    >>> import tempfile, os, torch, ftrain
    >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
    >>> f = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> ftrain.checkpoint.save_safetensors(state, f)
    >>> sorted(ftrain.checkpoint.load_safetensors(f))
    ['bias', 'weight']
    """
    tensors = dict(state) if isinstance(state, Mapping) else state_dict(state, buffers=buffers)
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_safetensors: {k!r} is a {type(v).__name__}, expected a tensor")
    safetensors_torch = _safetensors()
    # safetensors refuses shared or non-contiguous storage: write independent contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    safetensors_torch.save_file(tensors, os.fspath(path), metadata=dict(metadata) if metadata else None)


def load_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a dict of tensors on ``device``."""
    return _safetensors().load_file(os.fspath(path), device=str(device))


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "save_safetensors/load_safetensors need the safetensors package: pip install safetensors "
            "(or pip install 'ftrain[export]')"
        ) from e
    return safetensors.torch
