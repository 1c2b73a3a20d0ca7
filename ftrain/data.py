"""Deterministic, resumable data loading.

:class:`Loader` batches a map-style dataset (anything with ``__len__`` and
``__getitem__``) in an order that is a pure function of ``(seed, epoch)``: the
permutation comes from :mod:`ftrain.random`, never from the global RNG. Its
position (epoch and next batch) is a small dict, :meth:`Loader.state_dict`,
that the checkpoint stores beside the state, so a resumed run sees exactly the
batches the uninterrupted run would have seen.

Example:
    >>> import torch
    >>> from ftrain.data import Loader
    >>> ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    >>> loader = Loader(ds, batch_size=4, seed=0)
    >>> len(loader)
    2
    >>> first = [b[0].tolist() for b in loader]
    >>> pos = loader.state_dict()
    >>> pos
    {'seed': 0, 'epoch': 1, 'batch': 0, 'size': 10}
    >>> again = Loader(ds, batch_size=4, seed=0)
    >>> again.load_state_dict({'seed': 0, 'epoch': 0, 'batch': 1, 'size': 10})
    >>> [b[0].tolist() for b in again] == first[1:]
    True
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import select
import sys
import threading
import time
from collections import ChainMap
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.utils.data

from . import random, tree
from ._validate import check_int

__all__ = ["Loader", "default_collate", "epoch_order"]


def epoch_order(size: int, seed: int, epoch: int, *, shuffle: bool = True) -> torch.Tensor:
    """The order (int64 indices) in which an epoch visits a dataset of ``size`` items.

    A pure function of ``(size, seed, epoch)``: a stable argsort of counter-based
    random words from :mod:`ftrain.random`, so it is the same on every run,
    machine and torch version, and it never reads or advances the global RNG.

    >>> epoch_order(5, seed=0, epoch=0).tolist() == epoch_order(5, seed=0, epoch=0).tolist()
    True
    >>> epoch_order(4, seed=0, epoch=0, shuffle=False).tolist()
    [0, 1, 2, 3]
    """
    if not shuffle:
        return torch.arange(size, dtype=torch.int64)
    k = random.fold_in(random.key(seed), epoch)
    return torch.argsort(random.bits(k, (size,)), stable=True)


class Loader:
    """Batches of a map-style dataset in a resumable order fixed by ``(seed, epoch)``.

    Each ``iter(loader)`` runs over the rest of the current epoch and then moves
    the position to the next epoch, so ``for batch in loader`` is one epoch and
    ``len(loader)`` is the number of batches in a full epoch.

    ``batch_size`` is the *global* batch size. With ``world_size > 1`` every
    rank gets its own contiguous slice (``batch_size // world_size`` items) of
    each global batch, so the global batches do not depend on the number of
    ranks and all ranks take the same number of steps.

    ``num_workers > 0`` loads in ``torch.utils.data.DataLoader`` worker
    processes (the batch order is still ours). Workers are seeded from
    ``(seed, epoch, batch)``; a dataset that draws random augmentations should
    derive them from the item index (e.g. ``ftrain.random.fold_in``) to stay
    exactly reproducible across a resume.

    Args:
        dataset: has ``__len__`` and ``__getitem__(int)``.
        batch_size: items per global batch.
        shuffle: permute the items each epoch (else visit them in index order).
        seed: the seed of the permutation.
        drop_last: drop the last incomplete batch of an epoch (keeps shapes
            fixed, so a compiled step does not recompile).
        num_workers: ``DataLoader`` worker processes (0: load in this process).
        rank, world_size: this process's slice of each global batch.
        collate_fn: turns a list of items into a batch (default:
            ``torch.utils.data.default_collate``, except that tuple items give
            tuple batches rather than lists, so a batch made by hand as
            ``(x, y)`` has the same structure as the loader's and a compiled
            step sees one batch type).
        pin_memory: pin batches for faster host-to-GPU copies.
        multiprocessing_context: how workers start (``"fork"``, ``"forkserver"``,
            ``"spawn"``). Default: the platform's, except once jax is imported
            (a :class:`ftrain.CheckpointManager` imports it): forking a process
            that runs jax's threads can deadlock, so workers then start with
            ``"forkserver"``. Workers that are not forked receive the dataset and
            ``collate_fn`` by pickling: with ``cloudpickle`` installed, ftrain sends
            them by value (tensors still by shared memory), so a Dataset class
            defined inside a function works too.

    Workers exit as soon as this process is gone, however it died (SIGKILL
    included): each watches its pid. (A forkserver's workers are its children,
    not this process's, so PyTorch's own watchdog, which watches the parent,
    would keep them and the forkserver alive.)

    Example:
        >>> import torch
        >>> ds = torch.utils.data.TensorDataset(torch.arange(8))
        >>> [b[0].tolist() for b in Loader(ds, 4, shuffle=False, world_size=2, rank=1)]
        [[2, 3], [6, 7]]
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"Loader needs a map-style dataset (with __len__ and __getitem__), got {type(dataset).__name__}; "
                "wrap an iterable source in a list or a torch.utils.data.Dataset"
            )
        self.dataset = dataset
        self.batch_size = check_int(batch_size, "batch_size", who="Loader", low=1)
        self.seed = check_int(seed, "seed", who="Loader", low=None)
        self.num_workers = check_int(num_workers, "num_workers", who="Loader", low=0)
        self.world_size = check_int(world_size, "world_size", who="Loader", low=1)
        self.rank = check_int(rank, "rank", who="Loader", low=0)
        if rank >= world_size:
            raise ValueError(f"Loader: rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"Loader: batch_size is the global batch and must divide evenly among ranks, got "
                f"batch_size={batch_size}, world_size={world_size}; use a multiple of {world_size}"
            )
        self._size = size = len(dataset)
        if drop_last and size < batch_size:
            raise ValueError(
                f"Loader: the dataset has {size} items, fewer than batch_size={batch_size}, and drop_last=True "
                "leaves no batch; lower batch_size or pass drop_last=False"
            )
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self._epoch, self._batch = 0, 0  # the position of the next batch

    def __len__(self) -> int:
        """Batches in one full epoch."""
        if self.drop_last:
            return self._size // self.batch_size
        return -(-self._size // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        self._roll_over()
        return self._epoch

    def batch_indices(self, epoch: int) -> list[list[int]]:
        """The dataset indices of this rank's part of every batch of ``epoch``, in order.

        >>> import torch
        >>> Loader(torch.utils.data.TensorDataset(torch.arange(6)), 2, shuffle=False).batch_indices(0)
        [[0, 1], [2, 3], [4, 5]]
        """
        order = epoch_order(self._size, self.seed, epoch, shuffle=self.shuffle)
        batches = []
        for b in range(len(self)):
            global_batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            batches.append(torch.tensor_split(global_batch, self.world_size)[self.rank].tolist())
        return batches

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch, as a small JSON-able dict.

        ``size`` (the dataset length) lets :meth:`load_state_dict` refuse a
        position taken over different data.
        """
        self._roll_over()
        return {"seed": self.seed, "epoch": self._epoch, "batch": self._batch, "size": self._size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Move to a position returned by :meth:`state_dict` (e.g. from a checkpoint)."""
        if not isinstance(state, dict) or not {"epoch", "batch"} <= set(state):
            raise ValueError(
                f"Loader.load_state_dict expects a dict from Loader.state_dict() with keys 'epoch' and 'batch', "
                f"got {state!r}"
            )
        epoch, batch = state["epoch"], state["batch"]
        check_int(epoch, "epoch", who="Loader", low=0)
        check_int(batch, "batch", who="Loader", low=0)
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(
                f"Loader.load_state_dict: the position was saved by a loader with seed={state['seed']}, this loader "
                f"has seed={self.seed}; the batches would differ. Build the Loader with seed={state['seed']}"
            )
        if "size" in state and state["size"] != self._size:
            raise ValueError(
                f"Loader.load_state_dict: the position was saved over a dataset of {state['size']} items, this "
                f"dataset has {self._size}; resuming would visit different items. Use the same dataset"
            )
        if batch > len(self):
            raise ValueError(
                f"Loader.load_state_dict: batch={batch} is past the end of an epoch of {len(self)} batches; "
                "was the position saved with another batch_size?"
            )
        self._epoch, self._batch = epoch, batch

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch, batch by batch; then the position moves to the next epoch."""
        self._roll_over()
        epoch, start = self._epoch, self._batch
        batches = self.batch_indices(epoch)[start:]
        if self.num_workers == 0:
            source: Any = (self.collate_fn([self.dataset[i] for i in idx]) for idx in batches)
        else:
            # Seeded per (seed, epoch, start) so worker RNG does not come from the global generator.
            seed = int(random.bits(random.fold_in(random.fold_in(random.key(self.seed), epoch), start), ())) % 2**63
            context = self.multiprocessing_context or _default_context()
            dataset, collate_fn = self.dataset, self.collate_fn
            if context not in (None, "fork"):  # the workers get these by pickling, not by inheriting them
                dataset = _by_value(dataset, "dataset", context)
                collate_fn = _by_value(collate_fn, "collate_fn", context)
            source = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=_Fixed(batches),
                num_workers=self.num_workers,
                collate_fn=collate_fn,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(seed),
                multiprocessing_context=context,
                worker_init_fn=functools.partial(_watch_trainer, os.getpid()),
            )
        for i, batch in enumerate(source, start=start):
            # The position moves before the yield: a checkpoint taken while the consumer holds
            # batch i must resume at batch i + 1.
            self._batch = i + 1
            if self.pin_memory and self.num_workers == 0:
                batch = _pin(batch)
            yield batch

    def _roll_over(self) -> None:
        if self._batch >= len(self):
            self._epoch, self._batch = self._epoch + 1, 0

    def __repr__(self) -> str:
        return (
            f"Loader(size={self._size}, batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self._epoch}, batch={self._batch}, rank={self.rank}/{self.world_size})"
        )


class _Fixed(torch.utils.data.Sampler):
    """A batch sampler that replays a precomputed list of index batches."""

    def __init__(self, batches: Sequence[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _watch_trainer(pid: int, worker_id: int) -> None:
    """In a worker: exit the moment process ``pid`` (the one iterating the Loader) is gone.

    A forkserver's workers are its children, and each holds the forkserver open (it lives while
    any of its clients does): killed, the trainer would leave all of them running. Once the
    workers exit, the forkserver and multiprocessing's resource tracker exit too.
    """
    threading.Thread(target=_exit_when_gone, args=(pid,), name="ftrain-watch-trainer", daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)  # readable once the process has exited (Linux 5.3+): no polling
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([pidfd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user (the pid was reused)
        return True
    return True


class _ByValue:
    """``obj``, pickled by cloudpickle (a class or function defined anywhere travels by value) with
    multiprocessing's reducers kept, so tensors still go by shared memory.

    Unpickled in a worker, it *is* ``obj``; here it forwards what ``DataLoader`` calls.
    """

    def __init__(self, obj: Any):
        self.obj = obj

    def __reduce__(self) -> tuple:
        import cloudpickle

        buffer = io.BytesIO()
        pickler = cloudpickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = ChainMap(ForkingPickler(io.BytesIO()).dispatch_table, pickler.dispatch_table)
        pickler.dump(self.obj)
        return cloudpickle.loads, (buffer.getvalue(),)

    def __len__(self) -> int:
        return len(self.obj)

    def __getitem__(self, index: Any) -> Any:
        return self.obj[index]

    def __call__(self, items: list[Any]) -> Any:
        return self.obj(items)


LOCAL_OBJECT = (
    "Loader: the {what} ({name}) is defined inside a function, and workers started with {context!r} (the default "
    "once jax is loaded, e.g. by a CheckpointManager) receive it by pickling, which needs a module-level "
    "definition. Move it to module level, or `pip install cloudpickle` (ftrain then sends it by value), or pass "
    "multiprocessing_context='fork'"
)


def _by_value(obj: Any, what: str, context: str) -> Any:
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        # Said here, before a worker starts, instead of "Can't pickle local object" from deep in DataLoader.
        name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        if "<locals>" in name or "<lambda>" in name:
            raise TypeError(LOCAL_OBJECT.format(what=what, name=name, context=context)) from None
        return obj
    return _ByValue(obj)


def _pin(batch: Any) -> Any:
    return tree.map(lambda x: x.pin_memory() if isinstance(x, torch.Tensor) else x, batch)


def _default_context() -> str | None:
    # jax warns (and may deadlock) when a process running its threads forks.
    return "forkserver" if "jax" in sys.modules else None


def default_collate(items: list[Any]) -> Any:
    """``torch.utils.data.default_collate``, but tuple items give a tuple batch (torch gives a list).

    >>> import torch
    >>> default_collate([(torch.tensor(1), torch.tensor(2)), (torch.tensor(3), torch.tensor(4))])
    (tensor([1, 3]), tensor([2, 4]))
    """
    batch = torch.utils.data.default_collate(items)
    return tuple(batch) if type(items[0]) is tuple and isinstance(batch, list) else batch
