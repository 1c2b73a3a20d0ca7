"""Checkpoints of a state that lives on a :class:`ftrain.Mesh`, on torch.distributed.checkpoint.

Why DCP and not orbax here (measured, see FINDINGS.md): orbax takes its process identity from
jax only, so under ``torchrun`` every rank believes it is process 0 of 1 and sharded writes
race; DCP writes each rank's shards in parallel, de-duplicates replicated tensors (written
once), and reshards on load (2 ranks -> 1 process, ``Shard(0)`` -> full). What DCP lacks,
this module adds: step directories, an atomic commit, keep-last / keep-best rotation and
"latest", with the same duck-typed interface as :class:`ftrain.CheckpointManager`.

Measured (``benchmarks/mesh_checkpoint.py``, 0.38 GiB Adam state, 2 gloo ranks on a shared
2-core CPU): a sharded sync save 1.06 s vs 1.79 s for orbax writing the replicated state from
rank 0 alone; an async save blocks the loop 0.59 s; a replicated state through DCP 1.37 s
(each tensor written once, spread over the ranks); restore 1.04 s on 2 ranks, 2.2 s into one
process.

Layout::

    directory/
      8/                 a committed step: DCP files + .metadata + ftrain.json
      10.tmp/            a save in progress (or killed mid-way): never restored, removed on start

Every rank writes its part into ``<step>.tmp``; DCP's coordinator (rank 0) writes
``.metadata`` only after every rank has reported, and then rank 0 writes ``ftrain.json`` and
renames the directory to ``<step>`` (one atomic ``rename``). A job killed at any point leaves
either a complete step or a ``.tmp`` directory that is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import tree
from ..mesh import Mesh, _is_dtensor

__all__ = ["ShardedCheckpointManager"]

_META = "ftrain.json"
_STEP_DIR = re.compile(r"^(\d+)$")


class ShardedCheckpointManager:
    """Save and restore a (sharded or replicated) state from every rank of a mesh.

    The interface the loop calls is the same as :class:`ftrain.CheckpointManager`:
    :meth:`should_save`, :meth:`save`, :meth:`restore_latest`, :meth:`wait`, :meth:`close`.
    Call every method on every rank (they are collective).

    Args:
        directory: where step directories go (shared by all ranks, e.g. a shared filesystem).
        mesh: the job's mesh (``Mesh.local()`` when omitted).
        save_every: :meth:`should_save` is true every this many steps (``None``: never;
            :meth:`save` then saves whenever called).
        keep: keep the latest this many steps (``None``: keep all).
        best: a metric name passed in ``save(..., metrics=...)``, e.g. ``"val/loss"``; the
            best ``keep_best`` steps by it are kept as well. Under a mesh, pass metrics
            already averaged over the ranks (:meth:`Mesh.reduce_metrics`): rank 0's are stored.
        mode: ``"min"`` or ``"max"``: which way ``best`` is better.
        keep_best: how many of the best steps to keep.
        async_save: copy the state to host memory and write it in a background thread
            (over a separate gloo group, so it never interleaves with the step's collectives).
            On a 1-process mesh saves are synchronous.
        timeout: seconds before a checkpoint collective gives up instead of hanging.

    Example:
        >>> import tempfile, torch, ftrain
        >>> from ftrain.mesh import ShardedCheckpointManager
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
        >>> manager = ShardedCheckpointManager(tempfile.mkdtemp(), async_save=False)
        >>> manager.save(state)
        True
        >>> restored, extras = manager.restore_latest(state)
        >>> ftrain.tree.equal(restored.params, state.params), extras["data"]
        (True, None)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        save_every: int | None = None,
        keep: int | None = 3,
        best: str | None = None,
        mode: str = "min",
        keep_best: int = 1,
        async_save: bool = True,
        timeout: float = 600.0,
    ):
        if save_every is not None and (
            isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1
        ):
            raise ValueError(f"ShardedCheckpointManager: save_every must be a positive int or None, got {save_every!r}")
        for name, value in (("keep", keep), ("keep_best", keep_best)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ShardedCheckpointManager: {name} must be a positive int, got {value!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"ShardedCheckpointManager: mode must be 'min' or 'max', got {mode!r}")
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"ShardedCheckpointManager: mesh must be an ftrain.Mesh, got {type(mesh).__name__}")
        self.directory = Path(directory).absolute()
        self.mesh = mesh if mesh is not None else Mesh.local()
        self.save_every, self.keep, self.best, self.mode = save_every, keep, best, mode
        self.keep_best, self.async_save = keep_best, async_save
        self._lock = threading.Lock()
        self._pending: Future | None = None
        self._committed: threading.Event | None = None
        self._error: BaseException | None = None
        self._group = None
        distributed = self.mesh.is_distributed
        if distributed:
            import datetime

            # A group of its own: a background save must not interleave with the step's collectives.
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        if self.mesh.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob("*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)  # a save killed mid-way: never committed
        self._barrier()

    # ---------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """The committed steps on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return sorted(s for s in steps if (self.directory / str(s) / _META).is_file())

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """True when ``step`` is a multiple of ``save_every``."""
        return self.save_every is not None and step > 0 and step % self.save_every == 0

    # ---------------------------------------------------------------- save
    def save(
        self,
        state: Any,
        *,
        data: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Write ``state`` at step ``int(state.step)`` from every rank; returns whether it saved.

        Skipped (``False``) when the step is already committed, or when ``save_every`` is
        set, ``force`` is not, and :meth:`should_save` says no. ``data`` (the data position)
        and ``metrics`` are stored as JSON beside it (rank 0's values). With ``async_save``
        this returns once the state is copied to host memory.
        """
        self.wait()  # one save in flight; also surfaces an error of the previous one
        step = int(state.step)
        if step in self.all_steps() or (not force and self.save_every is not None and not self.should_save(step)):
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.best is not None and self.best not in metrics:
            raise ValueError(
                f"ShardedCheckpointManager(best={self.best!r}) needs metrics[{self.best!r}] to rank checkpoints; "
                f"save() got metrics {sorted(metrics)}"
            )
        tensors, others = _split_state(state)
        meta = {"step": step, "data": dict(data) if data is not None else None, "metrics": metrics, "others": others}
        meta["world_size"] = self.mesh.size
        tmp = self.directory / f"{step}.tmp"
        if self.mesh.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        import torch.distributed.checkpoint as dcp

        no_dist = not self.mesh.is_distributed
        # On one process DCP's background writer warns on every call (from its own thread, where no
        # filter of ours applies), so a 1-process mesh saves synchronously; ftrain.CheckpointManager
        # is the single-process manager anyway.
        if self.async_save and not no_dist:
            with _single_process_ok():
                future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group, no_dist=no_dist)
            self._pending = future
            if self.mesh.is_main:
                self._committed = done = threading.Event()
                future.add_done_callback(lambda f: self._commit_after(f, step, meta, done))
        else:
            with _single_process_ok():
                dcp.save(tensors, checkpoint_id=str(tmp), process_group=self._group, no_dist=no_dist)
            if self.mesh.is_main:
                self._commit(step, meta)
            self._barrier()
        return True

    def _commit_after(self, future: Future, step: int, meta: dict, done: threading.Event) -> None:
        try:
            future.result()
            self._commit(step, meta)
        except BaseException as e:  # surfaced by wait(): a callback's own exception would be swallowed
            self._error = e
        finally:
            done.set()

    def _commit(self, step: int, meta: dict) -> None:
        with self._lock:
            tmp, final = self.directory / f"{step}.tmp", self.directory / str(step)
            with open(tmp / _META, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # force=True over a committed step
                shutil.rmtree(final)
            os.rename(tmp, final)  # the commit: atomic on POSIX
            _fsync_dir(self.directory)
            self._rotate()

    def _rotate(self) -> None:
        if self.keep is None:
            return
        steps = self.all_steps()
        kept = set(steps[-self.keep :])
        if self.best is not None:
            sign = 1.0 if self.mode == "min" else -1.0
            scored = sorted(steps, key=lambda s: (sign * self._metric(s), -s))
            kept |= set(scored[: self.keep_best])
        for s in steps:
            if s not in kept:
                shutil.rmtree(self.directory / str(s), ignore_errors=True)

    def _metric(self, step: int) -> float:
        value = self._read_meta(step)["metrics"].get(self.best)
        return float("inf") if value is None else float(value)

    def wait(self) -> None:
        """Block until the save in flight is written and committed; re-raise its error, if any."""
        pending, self._pending = self._pending, None
        committed, self._committed = self._committed, None
        if pending is not None:
            pending.result()
        if committed is not None:
            committed.wait()  # result() can return before the done-callback (the commit) has run
        self._barrier()  # rank 0's commit happens before anyone moves on
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"ShardedCheckpointManager: a background save failed: {error}") from error

    def close(self) -> None:
        """Finish the save in flight; call once at the end, on every rank."""
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    # ---------------------------------------------------------------- restore
    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, extras)`` from the newest committed step, or ``None`` when there is none.

        ``template`` gives the structure, dtypes and placement: a state sharded on this
        mesh loads its own shards, a plain state loads full tensors (so a checkpoint saved
        on N ranks restores at any world size, one process included). ``extras`` holds
        ``"data"`` (the saved data position), ``"metrics"`` and ``"step"``.
        """
        self.wait()
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(template, step)

    def restore(self, template: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """``(state, extras)`` from committed ``step``; see :meth:`restore_latest`. The template is not modified."""
        import torch.distributed.checkpoint as dcp

        path = self.directory / str(step)
        if not (path / _META).is_file():
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory}; committed steps: {self.all_steps()}"
            )
        meta = self._read_meta(step)
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        paths, leaves, spec = tree.flatten_with_path(template)
        targets: dict[str, torch.Tensor] = {}
        for p, t in zip(paths, leaves):
            if isinstance(t, torch.Tensor):
                _check_leaf(p, t, saved.get(p), path)
                targets[p] = t.detach().clone()  # load into copies: the template stays untouched
        extra = sorted(set(saved) - set(targets))
        if extra:
            raise ValueError(
                f"checkpoint {path} holds leaves the template lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
                "restore into a state built like the one that was saved (same model, optimizer and fields)"
            )
        with _single_process_ok():
            dcp.load(targets, checkpoint_id=str(path), process_group=self._group, no_dist=not self.mesh.is_distributed)
        others = meta.get("others", {})
        restored = [targets[p] if p in targets else others.get(p, t) for p, t in zip(paths, leaves)]
        extras = {"data": meta.get("data"), "metrics": meta.get("metrics", {}), "step": meta["step"]}
        return tree.unflatten(spec, restored), extras

    def _read_meta(self, step: int) -> dict[str, Any]:
        with open(self.directory / str(step) / _META) as f:
            return json.load(f)

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    def __repr__(self) -> str:
        return f"ShardedCheckpointManager({str(self.directory)!r}, keep={self.keep}, best={self.best!r}, mesh={self.mesh!r})"


def _split_state(state: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensor leaves by path (for DCP), and the other leaves (Python numbers) for the JSON."""
    paths, leaves, _ = tree.flatten_with_path(state)
    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, Any] = {}
    for p, t in zip(paths, leaves):
        if isinstance(t, torch.Tensor):
            if _is_dtensor(t):
                # dcp.async_save fails on a shard that is a view at a non-zero storage offset.
                local = t.to_local()
                if local.storage_offset() != 0:
                    from torch.distributed.tensor import DTensor

                    t = DTensor.from_local(
                        local.clone(), t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
                    )
            tensors[p] = t.detach()
        elif t is None or isinstance(t, (bool, int, float, str)):
            others[p] = t
        else:
            raise TypeError(
                f"cannot checkpoint state leaf {p} of type {type(t).__name__}: leaves must be tensors or Python "
                "numbers/strings; keep other objects out of the state (e.g. as a static field)"
            )
    return tensors, others


def _check_leaf(path: str, target: torch.Tensor, saved: Any, where: Path) -> None:
    if saved is None:
        raise ValueError(
            f"checkpoint {where} has no leaf {path}; restore into a state built like the one that was saved"
        )
    shape = tuple(getattr(saved, "size", ()))
    if shape != tuple(target.shape):
        raise ValueError(
            f"checkpoint {where} has {path} with shape {shape}, but the template has {tuple(target.shape)}; "
            "build the template with the same model configuration"
        )
    dtype = getattr(getattr(saved, "properties", None), "dtype", None)
    if dtype is not None and dtype != target.dtype:
        raise ValueError(
            f"checkpoint {where} has {path} as {dtype}, but the template has {target.dtype}; "
            "build the template with the saved dtype (cast after restoring if needed)"
        )


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    # DCP warns that it "assumes the intent is a single process" even when no_dist=True says so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
