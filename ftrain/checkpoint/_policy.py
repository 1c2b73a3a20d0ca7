"""What every checkpoint manager shares: the policy, the metadata, the errors and the protocol.

A manager is this policy over a storage backend. :class:`CheckpointPolicy` owns the public
methods (argument checks, the ``save_every`` schedule, which steps exist, keep-last and keep-best
rotation, the JSON metadata and its format version, the comparison of a checkpoint with a
template and its errors) and calls the backend for the storage alone: ``_steps``, ``_read_meta``,
``_write``, ``_finish``, ``_load``, ``_delete``, ``_sync`` and ``_close``. The single-process
backend is orbax (:class:`ftrain.CheckpointManager`), the mesh backend
``torch.distributed.checkpoint`` (:class:`ftrain.ShardedCheckpointManager`).

:class:`Checkpointer` is the smaller interface the loop types against; write your own manager
to it (it need not inherit anything).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypedDict, runtime_checkable

import torch

from .. import tree
from .._validate import check_int, check_number
from .._version import VERSION

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PREEMPTION_SIGNALS",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "Checkpointer",
    "PolicyOptions",
]

FORMAT = "ftrain-checkpoint"
FORMAT_VERSION = 1
"""The layout of the metadata this ftrain writes; it reads every version in ``_READABLE``."""
_READABLE = (1,)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals :func:`ftrain.fit` treats as a preemption notice by default: a scheduler's "stop soon"
(SLURM sends SIGTERM, and SIGUSR1 when asked with ``--signal``)."""

Record = Mapping[str, Any]
"""What ``save`` takes beside the state: the data position (JSON-able) and metrics (numbers, 0-d tensors)."""

BAD_LEAF = (
    "checkpoint: the leaf at {path} is a {kind}; a checkpointed state holds tensors and Python scalars "
    "(int, float, bool, str, None) only. Make it a tensor or a static field"
)
NEWER_FORMAT = (
    "{where} was written in checkpoint format version {version!r} (by ftrain {writer}); this ftrain "
    "({reader}) reads format version {readable}. Upgrade ftrain to restore it"
)


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


@runtime_checkable
class Checkpointer(Protocol):
    """The interface :func:`ftrain.fit` and :class:`ftrain.actions.Checkpoint` use.

    :class:`ftrain.CheckpointManager` and :class:`ftrain.ShardedCheckpointManager` implement it;
    so may your own manager.

    ``copies_state`` says whether :meth:`save` stages its own copy of the state before it returns
    (so a donating step may overwrite the state's memory while a write is still under way); when
    false, the loop hands a donated state over as a copy.

    Example:
        >>> import tempfile, ftrain
        >>> with ftrain.CheckpointManager(tempfile.mkdtemp()) as manager:
        ...     isinstance(manager, Checkpointer), manager.copies_state
        (True, True)
    """

    copies_state: bool

    def should_save(self, step: int) -> bool:
        """Whether the manager's schedule asks for a save after ``step``."""
        ...

    def save(
        self, state: Any, *, data: Record | None = None, metrics: Record | None = None, force: bool = False
    ) -> bool:
        """Save ``state`` (at ``int(state.step)``) with the data position and metrics; whether it saved.

        When a writer logs into a tracker's run (``ftrain.writers.MLflow``, ``WandB``), the
        :class:`~ftrain.actions.Checkpoint` action also passes ``trackers={tracker: run id}``, to
        come back as ``extras["trackers"]``; a manager that never sees such a writer may omit it.
        """
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


class PolicyOptions(TypedDict, total=False):
    """The policy's keyword arguments, which every manager takes (see :class:`CheckpointPolicy`)."""

    save_every: int | None
    keep: int | None
    best: str | None
    mode: str
    keep_best: int
    async_save: bool
    config: Mapping[str, Any] | None
    may_change: Iterable[str]
    save_every_seconds: float | None
    preemption_signals: Iterable[int]


class CheckpointPolicy:
    """The policy of a checkpoint manager over a storage backend (subclass it for a new backend).

    Args:
        directory: where the steps live.
        save_every: :meth:`should_save` is true every this many steps (``None``: never;
            :meth:`save` then saves whenever called).
        save_every_seconds: :meth:`should_save` is also true once this many seconds passed since
            the last save (the clock starts at the first :meth:`should_save`, after the first step,
            so compiling does not count). It bounds the work a hard kill can take; with
            ``save_every`` both apply. Under a mesh every rank gets the same answer, one call late.
        preemption_signals: the signals on which :func:`ftrain.fit` saves at the next step
            boundary and then raises :class:`ftrain.Preempted` (``()``: none, their handlers are
            left alone).
        keep: keep the latest this many steps (``None``: keep all).
        best: a metric name passed in ``save(..., metrics=...)``, e.g. ``"val/loss"``; the best
            ``keep_best`` steps by it are kept as well. A step saved without it is still saved
            and ranks below every step that has it (kept as the latest, never as the best).
        mode: ``"min"`` or ``"max"``: which way ``best`` is better.
        keep_best: how many of the best steps to keep.
        async_save: whether :meth:`save` may return before the write is durable.
        config: the run's configuration (a JSON-able dict), stored with every step; a directory
            whose latest step carries a different config is refused as another run's, naming the
            keys that differ.
        may_change: the config keys that may differ from the saved run's when it resumes; by
            default ``num_steps``, so a finished run can be extended. The new value is the one
            stored from then on.

    A backend implements the ``_``-methods below and declares ``copies_state``.

    Example (a backend that keeps its steps in memory):
        >>> import torch, ftrain
        >>> class InMemory(CheckpointPolicy):
        ...     copies_state = True  # _write copies the tensors before save() returns
        ...     def __init__(self, **policy):
        ...         super().__init__("in-memory", **policy)
        ...         self.steps = {}
        ...     def _steps(self): return list(self.steps)
        ...     def _read_meta(self, step): return self.steps[step][1]
        ...     def _write(self, step, state, meta):
        ...         paths, leaves, _ = ftrain.tree.flatten_with_path(state)
        ...         tensors = {p: t.clone() for p, t in zip(paths, leaves) if isinstance(t, torch.Tensor)}
        ...         self.steps[step] = (tensors, meta)
        ...     def _finish(self): pass  # _write is synchronous
        ...     def _load(self, step, template, meta): return self.steps[step][0]
        ...     def _delete(self, step): del self.steps[step]
        >>> manager = InMemory(keep=2)
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
        >>> for step in (1, 2, 3):
        ...     _ = manager.save(state.replace(step=torch.tensor(step)), metrics={"loss": 1 / step})
        >>> restored, extras = manager.restore_latest(state)
        >>> manager.all_steps(), extras["step"], extras["metrics"]
        ([2, 3], 3, {'loss': 0.3333333333333333})
    """

    copies_state: bool
    _packages: ClassVar[tuple[str, ...]] = ()  # the backend's own packages, recorded in the metadata
    _writes = True  # whether this process takes part in saves (a read-only one skips them)
    _owns_files = True  # whether this process deletes rotated steps (exactly one process does)

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
        may_change: Iterable[str] = ("num_steps",),
        save_every_seconds: float | None = None,
        preemption_signals: Iterable[int] = PREEMPTION_SIGNALS,
    ):
        who = type(self).__name__
        check_int(save_every, "save_every", who=who, none_ok=True)
        check_number(save_every_seconds, "save_every_seconds", who=who, low=0, open_low=True, none_ok=True)
        check_int(keep, "keep", who=who, none_ok=True, hint=" (keep all)")
        check_int(keep_best, "keep_best", who=who)
        if mode not in ("min", "max"):
            raise ValueError(f"{who}: mode must be 'min' or 'max', got {mode!r}")
        if best is not None and not isinstance(best, str):
            raise TypeError(f"{who}: best must be a metric name (str) or None, got {type(best).__name__}")
        self.directory = Path(directory).absolute()
        self.save_every, self.keep, self.keep_best = save_every, keep, keep_best
        self.save_every_seconds = save_every_seconds
        self.preemption_signals = _signals(preemption_signals, who)
        self._clock: float | None = None  # when the last save started (or the clock started)
        self._asked: tuple[int, bool] | None = None  # the last should_save: (step, answer)
        self.best, self.mode = best, mode
        self.async_save = async_save
        self.config = _json(config, "config", who) if config is not None else None
        if isinstance(may_change, str):
            raise TypeError(f"{who}: may_change must be a collection of config keys, got the string {may_change!r}")
        self.may_change = frozenset(may_change)
        self._checked_dir = False
        self._metrics: dict[int, float | None] = {}  # the `best` metric of each step read so far

    # ------------------------------------------------------------------ the backend's part
    def _steps(self) -> list[int]:
        """The complete steps in storage, in any order."""
        raise NotImplementedError

    def _read_meta(self, step: int) -> Any:
        """The JSON metadata of ``step`` as written; a CheckpointCorruptedError if unreadable."""
        raise NotImplementedError

    def _write(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing ``state`` and ``meta`` as ``step``, atomically; it may finish in :meth:`_finish`."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Block until the write in flight is complete, raising its error."""
        raise NotImplementedError

    def _load(self, step: int, template: Any, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of ``step`` by leaf path, like ``template``'s (already checked against ``meta``)."""
        raise NotImplementedError

    def _delete(self, step: int) -> None:
        raise NotImplementedError

    def _sync(self) -> None:
        """Wait for the other processes after a write or a rotation (a barrier); none by default."""

    def _close(self) -> None:
        """Release the backend's resources."""

    def _agree(self, due: bool) -> bool:
        """Whether the clock says save, the same on every process (one process: ``due`` itself)."""
        return due

    # ------------------------------------------------------------------ queries
    def should_save(self, step: int) -> bool:
        """Whether the schedule (``save_every``, ``save_every_seconds``) asks for a save after ``step``."""
        due = self.save_every is not None and step > 0 and step % self.save_every == 0
        if self.save_every_seconds is not None:
            now = time.monotonic()
            if self._clock is None:
                self._clock = now
            due = self._agree(now - self._clock >= self.save_every_seconds) or due
        self._asked = (step, due)
        return due

    def all_steps(self) -> list[int]:
        """The complete steps in the directory, ascending (a half-written step is not listed)."""
        return sorted(self._steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when the directory holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``best`` metric (``None`` without ``best`` or a step that has it)."""
        ranked = self._ranked(self.all_steps())
        return ranked[0] if ranked and self._metric(ranked[0]) is not None else None

    def metadata(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with ``step``: versions, config, data position, metrics, leaf table.

        Raises:
            CheckpointMismatchError: ``step`` was not written by ftrain.
            CheckpointError: it was written in a checkpoint format this ftrain cannot read.
            CheckpointCorruptedError: its metadata cannot be read.
        """
        meta = self._read_meta(step)
        where = self.directory / str(step)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"{where} is not an ftrain checkpoint (its metadata has no format={FORMAT!r}); was the directory "
                "written by another program? Use a new directory"
            )
        version = meta.get("format_version")
        if isinstance(version, bool) or version not in _READABLE:
            writer = (meta.get("versions") or {}).get("ftrain", "unknown")
            readable = ", ".join(map(str, _READABLE))
            raise CheckpointError(
                NEWER_FORMAT.format(where=where, version=version, writer=writer, reader=VERSION, readable=readable)
            )
        return meta

    # ------------------------------------------------------------------ save
    def save(
        self,
        state: Any,
        *,
        data: Record | None = None,
        metrics: Record | None = None,
        force: bool = False,
        trackers: Mapping[str, str] | None = None,
    ) -> bool:
        """Save ``state`` as step ``int(state.step)``; returns whether it saved.

        Skipped (``False``) when the step is already saved, when this process does not write, or
        when a schedule (``save_every``, ``save_every_seconds``) is set, ``force`` is not, and
        :meth:`should_save` says no. One save is in flight at a time: this first waits for the
        previous one.

        Args:
            state: a :class:`ftrain.TrainState` (or any pytree with an integer ``step``).
            data: the data position, e.g. ``loader.state_dict()`` (JSON-able).
            metrics: numbers (or 0-d tensors) saved with the step; ``best`` ranks by them.
            force: save even when the schedule says no.
            trackers: the run id of each tracker the run logs to (``{"mlflow": "8f2c..."}``), so a
                resumed run continues the same tracker runs.
        """
        who = f"{type(self).__name__}.save"
        step = _step_of(state, who)
        if not self._writes or (not force and not self._scheduled(step)):
            return False
        self.wait()
        if step in self.all_steps():
            return False
        self._clock = time.monotonic()  # every save restarts the clock of save_every_seconds
        tensors, scalars, order = _describe(state)
        self._check_directory(tensors, scalars, "save into")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "state_type": f"{type(state).__module__}.{type(state).__qualname__}",
            "fingerprint": _fingerprint(tensors, scalars),
            "tensors": tensors,
            "scalars": scalars,
            "order": order,
            "data": _json(data, "data", who) if data is not None else None,
            "metrics": {str(k): _to_float(v, k, who) for k, v in (metrics or {}).items()},
            "config": self.config,
            "trackers": _run_ids(trackers, who),
            "versions": _versions(self._packages),
            "time": time.time(),
        }
        self._write(step, state, meta)
        if not self.async_save:
            self.wait()
        return True

    def _scheduled(self, step: int) -> bool:
        if self.save_every is None and self.save_every_seconds is None:
            return True  # no schedule: save whenever asked
        if self._asked is not None and self._asked[0] == step:
            return self._asked[1]  # the answer the caller just had (asking the clock twice could differ)
        return self.should_save(step)

    def wait(self) -> None:
        """Block until the save in flight is complete (and the old steps rotated away)."""
        self._finish()
        if self._owns_files:
            self._rotate()
        self._sync()

    def _rotate(self) -> None:
        """Delete every step that is neither among the latest ``keep`` nor the best ``keep_best``."""
        if self.keep is None:
            return
        steps = self.all_steps()
        kept = set(steps[-self.keep :]) | set(self._ranked(steps)[: self.keep_best])
        for step in steps:
            if step not in kept:
                self._delete(step)
                self._metrics.pop(step, None)

    def _ranked(self, steps: list[int]) -> list[int]:
        """``steps`` best first by ``best``; those without the metric last; ties: the newer first."""
        if self.best is None:
            return []
        sign = 1.0 if self.mode == "min" else -1.0
        scores = {step: self._metric(step) for step in steps}
        return sorted(steps, key=lambda s: (scores[s] is None, sign * (scores[s] or 0.0), -s))

    def _metric(self, step: int) -> float | None:
        # A committed step never changes, so its metric is read once: rotation runs on every save.
        if step not in self._metrics:
            try:
                value = (self.metadata(step).get("metrics") or {}).get(self.best)
            except CheckpointError:  # an unreadable step ranks last; restoring it reports the damage
                return None
            self._metrics[step] = None if value is None else float(value)
        return self._metrics[step]

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
            saved = meta.get("config")
            changed = (
                sorted(
                    k
                    for k in set(self.config or {}) | set(saved or {})
                    if self.config.get(k) != saved.get(k) and k not in self.may_change
                )
                if self.config is not None and saved is not None
                else []
            )
            if changed:
                raise CheckpointMismatchError(
                    f"cannot {verb} {self.directory}: its checkpoints (latest step {latest}) come from another run, "
                    f"whose config differs in {changed} (saved { {k: saved.get(k) for k in changed} }, now "
                    f"{ {k: self.config.get(k) for k in changed} }). Use a new directory, or pass the saved config "
                    "to resume that run"
                )
        self._checked_dir = True

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, *, into: Any) -> Any:
        """The state saved at ``step`` (default: the latest), with the structure of ``into``.

        ``into`` is a template state (e.g. a freshly created one, or one placed on a mesh): the
        result has its tree structure, dtypes, devices (or placements) and static fields
        (``apply_fn``, ``tx``); only leaf values come from the checkpoint. The template is not
        modified.

        Raises:
            CheckpointMismatchError: the checkpoint's leaves differ from the template's (the
                message lists missing, unexpected and mis-shaped leaf paths) or the directory
                belongs to another run.
            CheckpointCorruptedError: the step's files cannot be read (names the step and the file).
            FileNotFoundError: no such step.
        """
        return self._restore(step, into)[0]

    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, extras)`` from the newest readable step, or ``None`` if the directory has none.

        ``extras`` has ``"data"`` (the data position saved with the step, or ``None``),
        ``"step"``, ``"metrics"``, ``"config"`` and ``"trackers"`` (the trackers' run ids, ``{}``
        when none were saved). A corrupted step is skipped with a warning and
        the previous one is tried.
        """
        self.wait()
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
            extras = {"data": meta["data"], "step": step, "metrics": meta["metrics"], "config": meta["config"]}
            return state, {**extras, "trackers": meta.get("trackers") or {}}  # (absent before trackers were saved)
        raise CheckpointCorruptedError(
            f"no readable checkpoint in {self.directory}: every step ({steps}) failed; the newest error: {errors[0]}",
            step=errors[0].step,
            path=errors[0].path,
        )

    def _restore(self, step: int | None, template: Any) -> tuple[Any, dict[str, Any]]:
        who = f"{type(self).__name__}.restore"
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{who}: {self.directory} holds no checkpoint")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{who}: no step {step} in {self.directory}; it holds {steps}")
        tensors, scalars, _ = _describe(template)
        meta = self.metadata(step)
        diff = _differences(meta, tensors, scalars)
        if diff:
            raise CheckpointMismatchError(
                f"cannot restore step {step} of {self.directory} into this template "
                f"({type(template).__name__}; the checkpoint holds a {meta['state_type']}): "
                + "; ".join(diff)
                + ". Build the template from the same model and optimizer as the saved run"
            )
        self._check_directory(tensors, scalars, "restore from")
        _warn_other_versions(meta, self.directory / str(step))
        loaded = self._load(step, template, meta)
        paths, leaves, spec = tree.flatten_with_path(template)
        out = [loaded[p] if isinstance(leaf, torch.Tensor) else meta["scalars"][p] for p, leaf in zip(paths, leaves)]
        return tree.unflatten(spec, out), meta

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Finish the save in flight and release the backend's resources (call on every process)."""
        self.wait()
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.directory)!r}, save_every={self.save_every}, keep={self.keep}, "
            f"best={self.best!r}, mode={self.mode!r}, async_save={self.async_save})"
        )


OTHER_VERSIONS = (
    "{where} was written by {saved}; this is {now}. The state restores exactly, but the steps after it "
    "may not be bit for bit the ones the saving run would have taken (kernels and random draws can differ "
    "between versions): resume with the saving versions for an exact continuation"
)


def _warn_other_versions(meta: dict[str, Any], where: Path) -> None:
    saved = meta.get("versions") or {}
    now = _versions(())
    differ = [name for name in ("ftrain", "torch") if saved.get(name, now[name]) != now[name]]
    if differ:
        describe = lambda v: ", ".join(f"{name} {v.get(name)}" for name in differ)  # noqa: E731
        message = OTHER_VERSIONS.format(where=where, saved=describe(saved), now=describe(now))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- the leaf table


def _describe(state: Any) -> tuple[dict[str, dict], dict[str, Any], list[str]]:
    """``(tensors, scalars, order)``: per-path (global) shape/dtype of tensor leaves, values of the others."""
    paths, leaves, _ = tree.flatten_with_path(state)
    tensors: dict[str, dict] = {}
    scalars: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[path] = {"shape": list(leaf.shape), "dtype": str(leaf.dtype).removeprefix("torch.")}
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            scalars[path] = leaf
        else:
            raise TypeError(BAD_LEAF.format(path=path, kind=type(leaf).__name__))
    return tensors, scalars, list(paths)


def _fingerprint(tensors: Mapping[str, dict], scalars: Mapping[str, Any]) -> str:
    table = [[p, d["shape"], d["dtype"]] for p, d in tensors.items()] + [[p, "scalar"] for p in scalars]
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16]


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


def _fmt(spec: Any) -> str:
    return spec if spec == "scalar" else f"{tuple(spec[0])} {spec[1]}"


def _short(items: list[str], limit: int = 10, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------- save arguments


def _signals(signals: Iterable[int], who: str) -> tuple[int, ...]:
    catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    signals = tuple(signals)
    for s in signals:
        if isinstance(s, bool) or not isinstance(s, int) or s not in catchable:
            raise ValueError(
                f"{who}: preemption_signals must be signal numbers a handler can catch (e.g. signal.SIGTERM, "
                f"signal.SIGUSR1), got {s!r} in {signals!r}; pass () for none"
            )
    return signals


def _step_of(state: Any, who: str) -> int:
    step = getattr(state, "step", None)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.dtype.is_floating_point:
        return int(step.item())
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    raise TypeError(
        f"{who}: the state must have an integer `step` (a 0-d int tensor, as ftrain.TrainState has), got "
        f"{type(state).__name__} with step={step!r}"
    )


def _to_float(value: Any, name: str, who: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{who}: metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        return float(value.item())  # a host sync, once per save
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{who}: metric {name!r} must be a number or 0-d tensor, got {type(value).__name__}")


def _run_ids(trackers: Mapping[str, str] | None, who: str) -> dict[str, str]:
    ids = dict(trackers or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
        raise TypeError(f"{who}: trackers must map tracker names to run ids, both strings, got {ids!r}")
    return ids


def _json(value: Any, name: str, who: str) -> Any:
    """``value`` through a JSON round trip (what a reader gets back), or a TypeError naming it."""
    try:
        return json.loads(json.dumps(dict(value) if isinstance(value, Mapping) else value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: {name} must be a JSON-able dict, got {value!r} ({e})") from e


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata

    versions = {"ftrain": VERSION, "torch": torch.__version__, "python": sys.version.split()[0]}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return versions
