"""An explicit device mesh: data parallel and sharded state on PyTorch's own distributed engine.

:class:`Mesh` is a thin layer over :class:`torch.distributed.device_mesh.DeviceMesh` with
named axes: ``dp`` (replicas that each see their own shard of the batch) and ``fsdp``
(ranks that also each see their own batch shard, but hold only a shard of the params
and optimizer state, FSDP/ZeRO-3 style). ``tp`` is reserved for later.

Every rank of the mesh is a *data rank*: it gets its own slice of every global batch
(:meth:`Mesh.shard_batch`, or :meth:`Mesh.loader_kwargs` for ``ftrain.data.Loader``), and
the gradients are averaged over all of them inside the compiled step
(:meth:`Mesh.pmean`, built on traceable functional collectives). A 1-process mesh
(:meth:`Mesh.local`, or :meth:`Mesh.from_env` outside ``torchrun``) has no process group
and makes every collective the identity, so single-device code is the same code.

Example (``torchrun --nproc-per-node 2 train.py``; the same script runs as one process):
    >>> import ftrain
    >>> mesh = ftrain.Mesh.from_env()          # dp = world size; one process outside torchrun
    >>> mesh.shape, mesh.rank, mesh.is_main
    ({'dp': 1, 'fsdp': 1}, 0, True)
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from . import tree
from ._validate import check_int, check_number
from .tree import PyTree

__all__ = ["AXES", "Mesh", "ShardedCheckpointManager"]  # noqa: F822 (served lazily by __getattr__)

AXES: tuple[str, ...] = ("dp", "fsdp")
"""The mesh axes ftrain knows, outermost first (``tp`` will come after ``fsdp``)."""


class Mesh:
    """Named-axis device mesh over ``torch.distributed.device_mesh.DeviceMesh``.

    Build it with :meth:`from_env` (under ``torchrun``: initializes the process group,
    gloo on CPU and NCCL on CUDA) or :meth:`local` (one process, no process group).
    Wrapping an existing ``DeviceMesh`` whose dim names are among :data:`AXES` works too.

    The axes are always ``("dp", "fsdp")``; an axis of size 1 costs nothing.

    Example:
        >>> import torch, ftrain
        >>> mesh = ftrain.Mesh.local()
        >>> grads = {"w": torch.ones(2)}
        >>> mesh.pmean(grads)["w"]              # identity on one process
        tensor([1., 1.])
        >>> mesh.shard_batch(torch.arange(4))   # this rank's rows of a global batch
        tensor([0, 1, 2, 3])
    """

    def __init__(self, device_mesh: Any = None, *, device: torch.device | str | None = None, _owns_group: bool = False):
        if device_mesh is None:
            self.device_mesh = None
            self.device = torch.device(device) if device is not None else torch.device("cpu")
            self._shape = dict.fromkeys(AXES, 1)
            self._rank, self._world = 0, 1
        else:
            from torch.distributed.device_mesh import DeviceMesh

            if not isinstance(device_mesh, DeviceMesh):
                raise TypeError(
                    f"Mesh expects a torch DeviceMesh (or None for one process), got {type(device_mesh).__name__}"
                )
            names = device_mesh.mesh_dim_names
            if names is None or not set(names) <= set(AXES):
                raise ValueError(
                    f"Mesh: the DeviceMesh's dim names must be among {AXES}, got {names}; pass mesh_dim_names"
                )
            if names != AXES:
                raise ValueError(
                    f"Mesh: the DeviceMesh must have dims {AXES} in this order (size 1 where unused), got {names}; "
                    f"e.g. init_device_mesh('cpu', (dp, fsdp), mesh_dim_names={AXES})"
                )
            world = dist.get_world_size()
            if device_mesh.size() != world:
                raise ValueError(
                    f"Mesh: the DeviceMesh has {device_mesh.size()} ranks but the job has world size {world}; "
                    "a mesh must span every rank of the job"
                )
            self.device_mesh = device_mesh
            self.device = torch.device(device) if device is not None else _default_device(device_mesh.device_type)
            self._shape = {n: int(device_mesh.size(i)) for i, n in enumerate(names)}
            self._rank, self._world = dist.get_rank(), world
        self._owns_group = _owns_group

    # ---------------------------------------------------------------- construction
    @classmethod
    def local(cls, device: torch.device | str | None = None) -> Mesh:
        """A 1-process mesh with no process group: every collective is the identity.

        >>> Mesh.local().size
        1
        """
        return cls(None, device=device)

    @classmethod
    def from_env(
        cls,
        *,
        dp: int | None = None,
        fsdp: int = 1,
        device_type: str | None = None,
        backend: str | None = None,
        timeout: float = 600.0,
    ) -> Mesh:
        """The mesh of this ``torchrun`` job, read from its environment (``WORLD_SIZE``, ``RANK``...).

        ``dp * fsdp`` must equal the world size; ``dp`` defaults to ``world_size // fsdp``.
        Initializes the default process group if needed (gloo for ``device_type="cpu"``,
        NCCL for ``"cuda"``; the default is CUDA when available), with ``timeout``
        seconds for collectives, so a lost rank fails the job instead of hanging it.
        On CUDA each rank computes on GPU ``LOCAL_RANK`` and NCCL's communicator is bound
        to it when the group starts. Outside ``torchrun`` (no ``WORLD_SIZE``) it returns
        :meth:`local`; under ``torchrun --nproc-per-node 1`` it still initializes the (1-rank)
        process group, so a single-GPU run goes through NCCL like a multi-GPU one.

        Every check runs before any collective, so a bad size fails on every rank at once.

        >>> Mesh.from_env().size       # one process outside torchrun
        1
        """
        check_int(dp, "dp", who="Mesh.from_env", none_ok=True)
        check_int(fsdp, "fsdp", who="Mesh.from_env")
        check_number(timeout, "timeout", who="Mesh.from_env", low=0, open_low=True)
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
        if dp is None:
            if world % fsdp:
                raise ValueError(
                    f"Mesh.from_env: world size {world} is not divisible by fsdp={fsdp}; "
                    f"launch a multiple of {fsdp} processes or change fsdp"
                )
            dp = world // fsdp
        if dp * fsdp != world:
            raise ValueError(
                f"Mesh.from_env: dp={dp} x fsdp={fsdp} = {dp * fsdp} ranks, but the job has world size {world} "
                f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}); launch with `torchrun --nproc-per-node {dp * fsdp}` "
                f"or pass sizes whose product is {world}"
            )
        if world == 1 and not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
            return cls.local(_default_device(device_type))  # plain `python train.py`: no process group
        owns = False
        if not dist.is_initialized():
            if backend is None:
                backend = "nccl" if device_type == "cuda" else "gloo"
            bind: dict[str, torch.device] = {}
            if device_type == "cuda":  # one GPU per rank: this node's LOCAL_RANK-th
                gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(gpu)
                if backend == "nccl":
                    # Binds the communicator to that GPU now: NCCL errors show at start, not at the first
                    # collective, and barriers use that GPU instead of guessing one.
                    bind["device_id"] = gpu
            dist.init_process_group(
                backend, timeout=datetime.timedelta(seconds=timeout), **bind, **_attempt_store(world, timeout)
            )
            owns = True
        from torch.distributed.device_mesh import init_device_mesh

        device_mesh = init_device_mesh(device_type, (dp, fsdp), mesh_dim_names=AXES)
        return cls(device_mesh, _owns_group=owns)

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` created it (call once, at the end)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # ---------------------------------------------------------------- identity
    @property
    def shape(self) -> dict[str, int]:
        """Size of each axis, e.g. ``{'dp': 2, 'fsdp': 1}``."""
        return dict(self._shape)

    @property
    def size(self) -> int:
        """Number of ranks in the mesh (the world size)."""
        return self._world

    @property
    def rank(self) -> int:
        """This process's global rank (0 on a 1-process mesh)."""
        return self._rank

    @property
    def is_main(self) -> bool:
        """True on rank 0: the one rank that writes logs, progress and replicated checkpoints."""
        return self._rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when the mesh has more than one rank."""
        return self._world > 1

    def axis_size(self, axis: str) -> int:
        """Size of one named axis."""
        return self._shape[self._check_axis(axis)]

    def axis_rank(self, axis: str) -> int:
        """This rank's coordinate along ``axis``."""
        self._check_axis(axis)
        if self.device_mesh is None:
            return 0
        return int(self.device_mesh.get_local_rank(axis))

    def _check_axis(self, axis: str) -> str:
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; this mesh has axes {AXES}")
        return axis

    def __repr__(self) -> str:
        where = "local" if self.device_mesh is None else f"rank {self._rank}/{self._world}"
        return f"Mesh({', '.join(f'{k}={v}' for k, v in self._shape.items())}, {self.device.type}, {where})"

    # ---------------------------------------------------------------- data
    @property
    def data_size(self) -> int:
        """How many ranks each global batch is split over (every rank of the mesh)."""
        return self._world

    @property
    def data_rank(self) -> int:
        """Which slice of each global batch this rank takes."""
        return self._rank

    def loader_kwargs(self) -> dict[str, int]:
        """``{"rank": ..., "world_size": ...}`` for ``ftrain.data.Loader`` (per-rank batch shards).

        >>> Mesh.local().loader_kwargs()
        {'rank': 0, 'world_size': 1}
        """
        return {"rank": self.data_rank, "world_size": self.data_size}

    def check_batch_size(self, global_batch_size: int) -> int:
        """The per-rank batch size for ``global_batch_size``; a clear error unless it divides evenly.

        >>> Mesh.local().check_batch_size(32)
        32
        """
        n = self.data_size
        if global_batch_size % n:
            lo, hi = (global_batch_size // n) * n, (global_batch_size // n + 1) * n
            raise ValueError(
                f"a global batch of {global_batch_size} rows cannot be split evenly over {n} data-parallel ranks "
                f"(mesh {self.shape}); use a global batch size that is a multiple of {n}, e.g. {lo or hi} or {hi}"
            )
        return global_batch_size // n

    def shard_batch(self, batch: PyTree) -> PyTree:
        """This rank's rows (dim 0) of a global ``batch``, the same on every run.

        Rank ``r`` of ``n`` takes rows ``[r*B/n, (r+1)*B/n)``: contiguous, so the data-parallel
        mean over ranks equals the mean over the global batch. Every tensor leaf must
        have the same dim-0 size ``B``, a multiple of the data-parallel size.
        """
        paths, leaves, spec = tree.flatten_with_path(batch)
        sizes = {p: t.shape[0] for p, t in zip(paths, leaves) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if not sizes:
            raise ValueError("Mesh.shard_batch: the batch has no tensor with a batch dim (dim 0) to split")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Mesh.shard_batch: the batch's leaves disagree on their batch size (dim 0): {sizes}")
        per_rank = self.check_batch_size(next(iter(sizes.values())))
        start = self.data_rank * per_rank
        out = [t[start : start + per_rank] if p in sizes else t for p, t in zip(paths, leaves)]
        return tree.unflatten(spec, out)

    # ---------------------------------------------------------------- collectives inside the step
    def pmean(self, grads: PyTree, *, like: PyTree | None = None) -> PyTree:
        """Average ``grads`` over every data rank; traceable, so it runs inside the compiled step.

        Plain tensors are all-reduced (one collective per dtype: the leaves are packed
        into one flat buffer). Where ``like`` (the params) holds DTensors, the matching
        gradient, which each rank computed in full, is reduce-scattered into that
        param's placement instead (the FSDP/ZeRO-3 step). Integer leaves, and a tuple's
        empty parts (the buffers of a model without any), are left as they are. Identity on
        one process.

        >>> Mesh.local().pmean({"w": torch.ones(1)})
        {'w': tensor([1.])}
        """
        if like is not None:
            self._check_sharded(like, "params")
        if self._world == 1:
            return grads
        if isinstance(grads, tuple) and any(_is_empty(g) for g in grads):
            # Dynamo cannot flatten an empty dict through optree (a model without buffers): reduce the rest.
            full = [i for i, g in enumerate(grads) if not _is_empty(g)]
            reduced = self.pmean(
                tuple(grads[i] for i in full), like=None if like is None else tuple(like[i] for i in full)
            )
            out = list(grads)
            for i, r in zip(full, reduced):
                out[i] = r
            return tuple(out)
        leaves, spec = tree.flatten(grads)
        targets = tree.leaves(like) if like is not None else [None] * len(leaves)
        if len(targets) != len(leaves):
            tree.assert_same_structure(like, grads, names=["params", "grads"])
        out: list[Any] = list(leaves)
        # Integer and bool leaves (counters) are left as they are: a mean would turn them into floats.
        plain = [
            i
            for i, (g, t) in enumerate(zip(leaves, targets))
            if not is_dtensor(t) and isinstance(g, torch.Tensor) and (g.is_floating_point() or g.is_complex())
        ]
        for i, g in zip(plain, _all_reduce_mean([leaves[i] for i in plain], self._world)):
            out[i] = g
        for i, t in enumerate(targets):
            if is_dtensor(t):
                out[i] = _reduce_scatter_mean(leaves[i], t, self._world)
        return tree.unflatten(spec, out)

    def gather(self, params: PyTree) -> PyTree:
        """Full, plain tensors for the step's forward: sharded (DTensor) leaves are all-gathered.

        Traceable; call it *outside* ``torch.func.grad`` (a redistribute inside the grad
        transform fails) and give the gradients back to :meth:`pmean` with ``like=params``.
        Plain leaves pass through untouched.
        """
        self._check_sharded(params, "params")
        return tree.map(lambda t: t.full_tensor() if is_dtensor(t) else t, params)

    def _check_sharded(self, params: PyTree, name: str) -> None:
        # Eager calls only (a step's first call and its fake-tensor pre-check): an error raised
        # while dynamo traces would reach the user as an opaque "Observed exception".
        if torch.compiler.is_compiling():
            return
        paths, leaves, _ = tree.flatten_with_path(params)
        for path, t in zip(paths, leaves):
            if is_dtensor(t) and (self.device_mesh is None or t.device_mesh != self.device_mesh):
                raise ValueError(
                    f"{name}{'' if path == '<root>' else path} is a DTensor on {t.device_mesh} but the step runs on {self!r}; "
                    "place the state on this mesh with mesh.shard(state) or mesh.replicate(state)"
                )

    # ---------------------------------------------------------------- placing a state
    def replicate(self, state: PyTree) -> PyTree:
        """``state`` as plain tensors, identical on every rank (rank 0's values are broadcast).

        Sharded (DTensor) leaves are gathered to full tensors. Run it once, eagerly, after
        building the state (each rank may have initialized its model differently).
        """

        def place(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if is_dtensor(t):
                return t.full_tensor()
            t = t.detach().clone()
            if self._world > 1:
                dist.broadcast(t, src=0)
            return t

        with torch.no_grad():
            return tree.map(place, state)

    def shard(self, state: Any, axis: str = "fsdp") -> Any:
        """``state`` with its params and optimizer state sharded over ``axis`` (FSDP/ZeRO-3).

        Each param and optimizer-state tensor with at least one dim becomes a
        ``DTensor`` split along dim 0 over ``axis`` (replicated over the other axes);
        0-d tensors, buffers, the step and the key stay plain replicated tensors.
        Values come from rank 0. A step built with ``mesh=`` gathers the params for the
        forward and reduce-scatters the gradients back (see :meth:`gather`, :meth:`pmean`).
        """
        self._check_axis(axis)
        if self.device_mesh is None or self._shape[axis] == 1:
            raise ValueError(
                f"Mesh.shard: axis {axis!r} has size 1 in {self!r}, so there is nothing to shard over; "
                f"build the mesh with Mesh.from_env({axis}=N) or keep the state replicated"
            )
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        state = self.replicate(state)  # every rank starts from rank 0's values

        def place(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                # Fresh placement objects per leaf: shared ones make dynamo guard on their identity,
                # and the step's outputs (which do not share them) would then recompile once.
                placements = [Shard(0) if n == axis else Replicate() for n in AXES]
                return distribute_tensor(t, self.device_mesh, placements)
            return t

        with torch.no_grad():
            return state.replace(params=tree.map(place, state.params), opt_state=tree.map(place, state.opt_state))

    def check_state(self, state: PyTree) -> None:
        """Raise a clear error, naming the leaf, if ``state`` is not placed on this mesh.

        Checks that sharded leaves live on this mesh's ``DeviceMesh`` and that every
        tensor is on this mesh's device type. Local metadata only: no collective, so a
        bad state fails on every rank at once instead of hanging one of them.
        """
        paths, leaves, _ = tree.flatten_with_path(state)
        for path, t in zip(paths, leaves):
            if not isinstance(t, torch.Tensor):
                continue
            if is_dtensor(t):
                self._check_sharded(t, f"state leaf {path}")
            elif t.device.type != self.device.type and t.device.type != "meta":
                raise ValueError(
                    f"state leaf {path} is on {t.device} but {self!r} computes on {self.device.type}; "
                    f"move the state first (e.g. ftrain.tree.map(lambda t: t.to({str(self.device)!r}), state))"
                )

    # ---------------------------------------------------------------- host side
    def reduce_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Mean of each metric over the ranks, as Python floats (one collective, one host sync).

        Call it only when a value is read (logging, early stopping): the step itself keeps
        metrics local so the hot loop has no extra collective.

        >>> Mesh.local().reduce_metrics({"loss": torch.tensor(0.5)})
        {'loss': 0.5}
        """
        names = list(metrics)
        if not names:
            return {}
        values = torch.stack([torch.as_tensor(metrics[n]).detach().reshape(()).double().cpu() for n in names])
        if self._world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu() / self._world
        return dict(zip(names, values.tolist()))

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self._world > 1:
            dist.barrier()


def _attempt_store(world: int, timeout: float) -> dict[str, Any]:
    """``init_process_group``'s store for this torchrun attempt (empty: its default).

    ``torchrun --max-restarts`` keeps one store for all attempts, and a restarted rank would read
    the process group's keys from the attempt before (the dead ranks' addresses) and fail with
    "Connection refused" (torch 2.13). A prefix per attempt keeps the attempts apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    store = dist.PrefixStore(f"ftrain/attempt_{restart}", agent)
    return {"store": store, "rank": int(os.environ["RANK"]), "world_size": world}


def _default_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a tensor placed on a device mesh, e.g. by :meth:`Mesh.shard`).

    >>> is_dtensor(torch.zeros(2))
    False
    """
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _is_empty(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple)) and len(x) == 0


def _all_reduce_mean(leaves: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    import torch.distributed._functional_collectives as funcol

    out: list[torch.Tensor] = list(leaves)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(leaves):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for idx in by_dtype.values():
        # Pack into one buffer: one collective instead of one per leaf (gloo pays per message).
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        flat = funcol.all_reduce(flat, "sum", dist.group.WORLD) / n
        for i, piece in zip(idx, torch.split(flat, [leaves[i].numel() for i in idx])):
            out[i] = piece.view(leaves[i].shape)
    return out


def _reduce_scatter_mean(grad: torch.Tensor, like: Any, n: int) -> Any:
    from torch.distributed.tensor import DTensor, Partial

    mesh = like.device_mesh
    partial = DTensor.from_local(grad, mesh, [Partial()] * mesh.ndim, run_check=False)
    return partial.redistribute(mesh, like.placements) / n


def __getattr__(name: str) -> Any:
    # ``ftrain.mesh.ShardedCheckpointManager`` is kept as a lazy alias: the manager lives in
    # ``ftrain.checkpoint``, which builds on ``Mesh``; importing it here would be a cycle.
    if name == "ShardedCheckpointManager":
        from .checkpoint import ShardedCheckpointManager

        return ShardedCheckpointManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
