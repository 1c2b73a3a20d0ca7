"""Worker for tests/test_mesh.py, launched with ``torchrun --nproc-per-node 2`` (gloo, CPU).

Scenarios (first argument):
  main    data-parallel run, sharded (fsdp) run with sharded checkpoints, restore on 2 ranks,
          a BatchNorm step, and (rank 0) the single-process reference over the global batch
  train   the sharded run alone, resumable from its checkpoints; ``--kill-at K`` makes
          rank 1 SIGKILL itself after step K
  errors  bad inputs: every rank records the error it gets

Results go to ``--out`` as ``*.pt`` / ``*.json`` files that the test reads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ftrain  # noqa: E402
from ftrain import optim  # noqa: E402
from ftrain.mesh import Mesh, ShardedCheckpointManager  # noqa: E402

STEPS = 6
GLOBAL_BATCH = 16
DIM_IN, DIM_OUT = 8, 3


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM_IN, 32), nn.Tanh(), nn.Linear(32, DIM_OUT))


def make_bn_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


def bn_loss_fn(apply, params, buffers, batch, key):
    out, buffers = apply(params, buffers, batch)
    return out.square().mean(), {}, buffers


def make_state(seed: int) -> ftrain.TrainState:
    # Different seeds per rank on purpose: Mesh.replicate / Mesh.shard must make them agree (rank 0 wins).
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    return ftrain.TrainState.create(make_model(seed), tx, key=ftrain.random.key(0))


def make_loader(mesh: Mesh) -> ftrain.data.Loader:
    """48 items, global batch 16: 3 steps an epoch, so a run crosses epochs. Each rank its slice."""
    g = torch.Generator().manual_seed(1000)
    data = torch.utils.data.TensorDataset(torch.randn(48, DIM_IN, generator=g), torch.randn(48, DIM_OUT, generator=g))
    return ftrain.data.Loader(data, GLOBAL_BATCH, seed=0, **mesh.loader_kwargs())


def forever(loader):
    while True:
        yield from loader


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    out, buffers = apply(params, buffers, x)
    return ((out - y) ** 2).mean()


def make_step(mesh: Mesh, backend: str):
    """The library's compiled step on ``mesh``: grads all-reduced (or reduce-scattered) inside it."""
    return ftrain.make_train_step(loss_fn, mesh=mesh, backend=backend)


def full(state) -> dict:
    """The state's tensors as plain full tensors (sharded leaves gathered)."""
    return ftrain.tree.map(lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t, state)


def train(mesh, state, step_fn, steps, manager=None, kill_at=None, loader=None):
    loader = loader if loader is not None else make_loader(mesh)
    batches, metrics = forever(loader), None
    while int(state.step) < steps:
        batch = next(batches)
        mesh.check_state(state)
        state, metrics = step_fn(state, batch)
        s = int(state.step)
        if manager is not None and manager.should_save(s):
            manager.save(state, data=loader.state_dict(), metrics={"loss": metrics["loss"]})
        if kill_at is not None and s == kill_at and mesh.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank lost mid-run, as on a real cluster
    return state, metrics


def tensors(state) -> dict:
    f = full(state)
    return {"params": f.params, "opt_state": f.opt_state, "step": f.step}


def scenario_main(args) -> None:
    out = Path(args.out)
    rank = int(os.environ["RANK"])
    # 1) data parallel: replicated state, each rank its half of every global batch
    mesh = Mesh.from_env()
    state = mesh.replicate(make_state(seed=100 + rank))
    dp_step = make_step(mesh, args.backend)
    dp_state, metrics = train(mesh, state, dp_step, STEPS)
    torch.save(tensors(dp_state), out / f"dp_rank{rank}.pt")
    # a replicated state's checkpoint: DCP de-duplicates, so each tensor is written by one rank only
    dp_manager = ShardedCheckpointManager(out / "dp_ckpt", mesh=mesh, async_save=False)
    dp_manager.save(dp_state)
    dp_manager.close()
    local_loss = float(metrics["loss"])
    reduced = mesh.reduce_metrics(metrics)
    # 2) sharded (fsdp=2): params and optimizer state as DTensors, sharded checkpoints every 2 steps
    fsdp = Mesh.from_env(fsdp=2)
    sharded = fsdp.shard(make_state(seed=100 + rank))
    placements = {k: str(v.placements) for k, v in sharded.params.items()}
    manager = ShardedCheckpointManager(out / "ckpt", mesh=fsdp, save_every=2, keep=2)
    sh_step = make_step(fsdp, args.backend)
    sh_state, _ = train(fsdp, sharded, sh_step, STEPS, manager)
    manager.wait()
    torch.save(tensors(sh_state), out / f"fsdp_rank{rank}.pt")
    # 3) the sharded checkpoint restores on the same 2 ranks into a fresh sharded template
    restored, extras = manager.restore_latest(fsdp.shard(make_state(seed=7)))
    same = ftrain.tree.equal(tensors(restored), tensors(sh_state))
    kinds = sorted({type(v).__name__ for v in restored.params.values()})
    manager.close()
    compiles = {"dp": dp_step.num_compiles, "fsdp": sh_step.num_compiles}
    # 4) the donating step (what fit uses) on a sharded state: same numbers as the pure step,
    # written into the shards it was given
    batch = next(forever(make_loader(fsdp)))
    pure, _ = sh_step(sh_state, batch)
    donated_in = ftrain.tree.map(torch.clone, sh_state)
    shard_ptr = donated_in.params["0.weight"].to_local().data_ptr()
    donated, _ = sh_step.donate(donated_in, batch)
    donate_equal = ftrain.tree.equal(tensors(donated), tensors(pure))
    donate_in_place = donated.params["0.weight"].to_local().data_ptr() == shard_ptr
    report = {
        "local_loss": local_loss,
        "reduced": reduced,
        "placements": placements,
        "restored_equal": same,
        "restored_kinds": kinds,
        "donate_equal": donate_equal,
        "donate_in_place": donate_in_place,
        "extras": extras,
        "steps_on_disk": manager.all_steps(),
        "compiles": compiles,
    }
    (out / f"main_rank{rank}.json").write_text(json.dumps(report))
    # 5) BatchNorm under data parallel: the step averages the running stats each rank updated
    # from its own slice; saved beside each rank's own eager update from the same start
    bn_state = mesh.replicate(ftrain.TrainState.create(make_bn_model(), optim.sgd(0.1)))
    x = torch.randn(GLOBAL_BATCH // 2, DIM_IN, generator=torch.Generator().manual_seed(rank))
    _, own = bn_state.apply_fn(bn_state.params, bn_state.buffers, x)
    bn_new, _ = ftrain.make_train_step(bn_loss_fn, mesh=mesh, backend=args.backend)(bn_state, x)
    torch.save({"stepped": bn_new.buffers, "own": own}, out / f"bn_rank{rank}.pt")
    # 6) rank 0 alone: the single-process run over the whole global batch (no process group used)
    if rank == 0:
        local = Mesh.local()
        ref, _ = train(local, make_state(seed=100), make_step(local, args.backend), STEPS)
        torch.save(tensors(ref), out / "single.pt")
    mesh.barrier()
    mesh.close()


def scenario_train(args) -> None:
    out = Path(args.out)
    rank = int(os.environ["RANK"])
    mesh = Mesh.from_env(fsdp=2)
    template = mesh.shard(make_state(seed=100 + rank))
    manager = ShardedCheckpointManager(out / "ckpt", mesh=mesh, save_every=2, keep=2)
    loader = make_loader(mesh)
    restored = manager.restore_latest(template)
    state = template
    if restored is not None:
        state, extras = restored
        loader.load_state_dict(extras["data"])  # the next batch, exactly where the saved run was
    (out / f"start_rank{rank}.txt").write_text(str(int(state.step)))
    state, _ = train(mesh, state, make_step(mesh, args.backend), STEPS, manager, kill_at=args.kill_at, loader=loader)
    manager.close()
    torch.save(tensors(state), out / f"final_rank{rank}.pt")
    mesh.close()


def scenario_errors(args) -> None:
    out = Path(args.out)
    rank = int(os.environ["RANK"])
    errors = {}

    def record(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"

    record("mesh_size", lambda: Mesh.from_env(dp=3))  # 3 ranks asked, 2 launched
    mesh = Mesh.from_env()
    record("batch", lambda: mesh.shard_batch(torch.zeros(15, DIM_IN)))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    state = mesh.replicate(make_state(seed=0))
    other = init_device_mesh("cpu", (2,), mesh_dim_names=("other",))
    alien = state.replace(
        params={**state.params, "0.weight": distribute_tensor(state.params["0.weight"], other, [Shard(0)])}
    )
    record("placement", lambda: mesh.check_state(alien))
    batch = next(iter(make_loader(mesh)))
    record("placement_step", lambda: make_step(mesh, "aot_eager")(alien, batch))  # fails before compiling
    record("shard_axis", lambda: mesh.shard(state))  # fsdp has size 1 on this mesh
    # Metrics are reduced only when read: rank-dependent values come back as their mean on every rank.
    errors["reduced"] = mesh.reduce_metrics({"rank": torch.tensor(float(rank)), "one": torch.tensor(1.0)})
    # pmean (eager here) over a mixed tree: each float dtype averaged, integer counters untouched
    mixed = {
        "a": torch.tensor([1.0, 2.0]) * rank,
        "b": torch.tensor(3.0 * rank, dtype=torch.float64),
        "n": torch.tensor(rank),
    }
    errors["pmean"] = {k: [v.tolist(), str(v.dtype)] for k, v in mesh.pmean(mixed).items()}
    # compiled, a tuple holding an empty dict (the buffers of a model without any) is reduced too
    grads, buffers = torch.compile(lambda t: mesh.pmean(({"g": t}, {})), backend="aot_eager", fullgraph=True)(
        torch.tensor([2.0 * rank])
    )
    errors["pmean_empty"] = [grads["g"].tolist(), buffers]
    (out / f"errors_rank{rank}.json").write_text(json.dumps(errors))
    mesh.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["main", "train", "errors"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a 2-core box
    {"main": scenario_main, "train": scenario_train, "errors": scenario_errors}[args.scenario](args)
