"""The mesh checkpoint backend: :class:`ShardedCheckpointManager`, on torch.distributed.checkpoint.

Why DCP and not orbax under a mesh: orbax takes its process identity from jax only, so under
``torchrun`` every rank believes it is process 0 of 1 and sharded writes race. DCP writes each
rank's shards in parallel, de-duplicates replicated tensors (each is written once) and reshards
on load (2 ranks -> 1 process, ``Shard(0)`` -> full). What DCP lacks, the shared policy
(:class:`ftrain.checkpoint.CheckpointPolicy`) and this module add: step directories, an atomic
commit, keep-last / keep-best rotation and "latest". The measured costs are in
docs/concepts/checkpoints.md.

Layout::

    directory/
      8/                 a committed step: DCP files + .metadata + ftrain.json
      10.tmp/            a save in progress (or killed mid-way): never restored, removed on start

Every rank writes its part into ``<step>.tmp``; DCP's coordinator (rank 0) writes ``.metadata``
only after every rank has reported, and then rank 0 writes ``ftrain.json`` and renames the
directory to ``<step>`` (one atomic ``rename``). A job killed at any point leaves either a
complete step or a ``.tmp`` directory that is ignored.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import tree
from .._validate import check_number
from ..mesh import Mesh, is_dtensor
from ._policy import CheckpointCorruptedError, CheckpointError, CheckpointPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._policy import PolicyOptions

__all__ = ["ShardedCheckpointManager"]

_META = "ftrain.json"
_STEP_DIR = re.compile(r"^(\d+)$")


class ShardedCheckpointManager(CheckpointPolicy):
    """Save and restore a (sharded or replicated) state from every rank of a mesh.

    The same policy and methods as :class:`ftrain.CheckpointManager` (:meth:`should_save`,
    :meth:`save`, :meth:`restore`, :meth:`restore_latest`, :meth:`wait`, :meth:`close`, ...);
    call every method on every rank (they are collective).

    Args:
        directory: where step directories go (shared by all ranks, e.g. a shared filesystem).
        mesh: the job's mesh (``Mesh.local()`` when omitted).
        save_every: :meth:`should_save` is true every this many steps (``None``: never;
            :meth:`save` then saves whenever called).
        keep: keep the latest this many steps (``None``: keep all).
        best: a metric name passed in ``save(..., metrics=...)``, e.g. ``"val/loss"``; the
            best ``keep_best`` steps by it are kept as well. A step saved without it ranks
            last (kept only while among the latest). Under a mesh, pass metrics already
            averaged over the ranks (:meth:`Mesh.reduce_metrics`): rank 0's are stored.
        mode: ``"min"`` or ``"max"``: which way ``best`` is better.
        keep_best: how many of the best steps to keep.
        async_save: copy the state to host memory and write it in a background thread
            (over a separate gloo group, so it never interleaves with the step's collectives).
            On a 1-process mesh saves are synchronous.
        config: the run's configuration (a JSON-able dict), stored with every step; a
            directory whose steps carry a different config is refused as another run's.
        timeout: seconds before a checkpoint collective gives up instead of hanging.

    Example:
        >>> import tempfile, torch, ftrain
        >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.identity())
        >>> manager = ftrain.ShardedCheckpointManager(tempfile.mkdtemp(), mesh=ftrain.Mesh.local())
        >>> manager.save(state, metrics={"loss": 0.5})
        True
        >>> restored, extras = manager.restore_latest(state)
        >>> ftrain.tree.equal(restored.params, state.params), extras["metrics"]
        (True, {'loss': 0.5})
        >>> manager.close()
    """

    copies_state = True
    """:meth:`save` returns only once the state is copied or written: a synchronous save has written
    it, and ``dcp.async_save`` stages a host copy of every tensor (its default stager copies
    synchronously, CPU tensors included) before it returns and writes that copy in the background.
    So a donating loop may overwrite the state right after :meth:`save` without copying it first."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        timeout: float = 600.0,
        **policy: Unpack[PolicyOptions],
    ):
        super().__init__(directory, **policy)
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"ShardedCheckpointManager: mesh must be an ftrain.Mesh, got {type(mesh).__name__}")
        check_number(timeout, "timeout", who="ShardedCheckpointManager", low=0, open_low=True)
        self.mesh = mesh if mesh is not None else Mesh.local()
        self._owns_files = self.mesh.is_main  # every rank writes its shards; rank 0 commits and rotates
        self._pending: Future | None = None
        self._committed: threading.Event | None = None
        self._error: BaseException | None = None
        self._group = self._clock_group = None
        self._clock_vote: tuple[Any, torch.Tensor] | None = None  # the clock's all-reduce in flight
        if self.mesh.is_distributed:
            # A group of its own: a background save must not interleave with the step's collectives.
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
            if self.save_every_seconds is not None:  # and one for the clock, beside a background save's
                self._clock_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        if self.mesh.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob("*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)  # a save killed mid-way: never committed
        self._sync()

    # ---------------------------------------------------------------- the backend
    def _steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [s for s in steps if (self.directory / str(s) / _META).is_file()]

    def _read_meta(self, step: int) -> Any:
        path = self.directory / str(step) / _META
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointCorruptedError(
                f"checkpoint step {step}: cannot read its metadata {path}: {type(e).__name__}: {e}",
                step=step,
                path=str(path),
            ) from e

    def _write(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        tensors = _dcp_tensors(state)
        meta = {**meta, "world_size": self.mesh.size}
        tmp = self.directory / f"{step}.tmp"
        if self.mesh.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._sync()
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

    def _commit_after(self, future: Future, step: int, meta: dict, done: threading.Event) -> None:
        try:
            future.result()
            self._commit(step, meta)
        except BaseException as e:  # surfaced by wait(): a callback's own exception would be swallowed
            self._error = e
        finally:
            done.set()

    def _commit(self, step: int, meta: dict) -> None:
        tmp = self.directory / f"{step}.tmp"
        with open(tmp / _META, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.directory / str(step))  # the commit: atomic on POSIX
        _fsync_dir(self.directory)

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        committed, self._committed = self._committed, None
        try:
            if pending is not None:
                pending.result()
            if committed is not None:
                committed.wait()  # result() can return before the done-callback (the commit) has run
        except BaseException as e:
            self._error = e
        error, self._error = self._error, None
        # Every rank learns of a failure on any rank (the commit is rank 0's alone), so all raise
        # together instead of the others waiting on rank 0 at the next collective.
        failed = error is not None
        if self._group is not None:
            flag = torch.tensor([int(failed)])
            dist.all_reduce(flag, group=self._group)
            failed = bool(flag.item())
        if failed:
            cause = f": {error}" if error is not None else " on another rank (see its log)"
            raise CheckpointError(f"ShardedCheckpointManager: a background save failed{cause}") from error

    def _load(self, step: int, template: Any, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        path = self.directory / str(step)
        paths, leaves, _ = tree.flatten_with_path(template)
        # Load into copies (the template stays untouched), placed like the template's leaves: a
        # sharded template loads its own shards, a plain one full tensors (DCP reshards).
        targets = {p: t.detach().clone() for p, t in zip(paths, leaves) if isinstance(t, torch.Tensor)}
        try:
            with _single_process_ok():
                dcp.load(
                    targets, checkpoint_id=str(path), process_group=self._group, no_dist=not self.mesh.is_distributed
                )
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointCorruptedError(
                f"checkpoint step {step} is corrupted or truncated: reading {path} failed: {type(e).__name__}: {first}",
                step=step,
                path=str(path),
            ) from e
        return targets

    def _delete(self, step: int) -> None:
        shutil.rmtree(self.directory / str(step), ignore_errors=True)

    def _sync(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    def _agree(self, due: bool) -> bool:
        # Each rank reads its own clock, but a save is collective: every call starts an all-reduce
        # (max) of this rank's verdict and returns the one started by the call before, so all
        # ranks save at the same step (one step late) and no call waits on the network.
        if self._clock_group is None:
            return due
        agreed = False
        if self._clock_vote is not None:
            work, vote = self._clock_vote
            work.wait()
            agreed = bool(vote)
        vote = torch.tensor([int(due)], dtype=torch.int32)
        self._clock_vote = (dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._clock_group, async_op=True), vote)
        return agreed

    def _close(self) -> None:
        for group in (self._group, self._clock_group):
            if group is not None:
                dist.destroy_process_group(group)
        self._group = self._clock_group = self._clock_vote = None

    def __repr__(self) -> str:
        return f"ShardedCheckpointManager({str(self.directory)!r}, keep={self.keep}, best={self.best!r}, mesh={self.mesh!r})"


def _dcp_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The tensor leaves of ``state`` by path, as DCP can write them."""
    paths, leaves, _ = tree.flatten_with_path(state)
    tensors: dict[str, torch.Tensor] = {}
    for p, t in zip(paths, leaves):
        if not isinstance(t, torch.Tensor):
            continue
        if is_dtensor(t) and t.to_local().storage_offset() != 0:
            # dcp.async_save fails on a shard that is a view at a non-zero storage offset.
            from torch.distributed.tensor import DTensor

            local = t.to_local().clone()
            t = DTensor.from_local(
                local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        tensors[p] = t.detach()
    return tensors


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
