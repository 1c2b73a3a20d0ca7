"""Checkpoint cost under a 2-process mesh (gloo, CPU): why ShardedCheckpointManager is built on DCP.

Launches itself under ``torchrun --nproc-per-node 2`` and times, side by side on one state
(an MLP with Adam: params + 2 moments):

    sharded state    ShardedCheckpointManager (DCP): every rank writes its own shards, sync
                     and async (time the training loop is blocked, and until committed)
    replicated state ShardedCheckpointManager (DCP de-duplicates: each tensor written once,
                     the work spread over the ranks) vs ftrain.CheckpointManager (orbax) on
                     rank 0 alone (orbax takes its process identity from jax only, so under
                     torchrun only one rank may write)
    restore          the sharded checkpoint into a sharded state on 2 ranks, and (in this
                     parent process) into a plain state on 1 process

Medians of ``--repeats`` saves; the box is shared, so trust the ratios, not the seconds.

    python benchmarks/mesh_checkpoint.py                 # ~100M floats of state (~0.4 GB)
    python benchmarks/mesh_checkpoint.py --width 1024    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ftrain  # noqa: E402


def make_state(width: int) -> ftrain.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.Linear(width, 10))
    return ftrain.TrainState.create(model, ftrain.optim.adam(1e-3))


def timed(fn, repeats: int, mesh: ftrain.Mesh) -> float:
    times = []
    for _ in range(repeats):
        mesh.barrier()
        t = time.perf_counter()
        fn()
        mesh.barrier()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    mesh = ftrain.Mesh.from_env(fsdp=2)
    out, results = Path(args.out), {}
    replicated = mesh.replicate(make_state(args.width))
    sharded = mesh.shard(replicated)
    counter = iter(range(1, 10**6))

    def save(manager, state):
        return lambda: manager.save(state.replace(step=torch.tensor(next(counter))), force=True) and manager.wait()

    sync = ftrain.ShardedCheckpointManager(out / "sharded", mesh=mesh, async_save=False, keep=1)
    results["sharded, DCP, sync save"] = timed(save(sync, sharded), args.repeats, mesh)
    asynchronous = ftrain.ShardedCheckpointManager(out / "sharded_async", mesh=mesh, keep=1)
    blocked = []
    for _ in range(args.repeats):
        mesh.barrier()
        t = time.perf_counter()
        asynchronous.save(sharded.replace(step=torch.tensor(next(counter))), force=True)
        blocked.append(time.perf_counter() - t)
        asynchronous.wait()
    results["sharded, DCP, async save: loop blocked"] = statistics.median(blocked)
    results["sharded, DCP, async save: until committed"] = timed(save(asynchronous, sharded), args.repeats, mesh)
    asynchronous.close()

    dedup = ftrain.ShardedCheckpointManager(out / "replicated", mesh=mesh, async_save=False, keep=1)
    results["replicated, DCP (each tensor once, spread), sync"] = timed(save(dedup, replicated), args.repeats, mesh)
    dedup.close()
    # orbax: rank 0 writes, the other rank waits (the measured way that works under torchrun)
    orbax = ftrain.CheckpointManager(out / "orbax", async_save=False, keep=1) if mesh.is_main else None
    mesh.barrier()

    def orbax_save():
        if orbax is not None:
            orbax.save(replicated.replace(step=torch.tensor(next(counter))), force=True)
            orbax.wait()

    results["replicated, orbax on rank 0 only, sync"] = timed(orbax_save, args.repeats, mesh)
    if orbax is not None:
        orbax.close()

    template = mesh.shard(make_state(args.width))
    results["restore sharded -> sharded, 2 ranks"] = timed(lambda: sync.restore_latest(template), args.repeats, mesh)
    sync.close()
    nbytes = sum(t.numel() * t.element_size() for t in ftrain.tree.leaves(replicated) if isinstance(t, torch.Tensor))
    if mesh.is_main:
        print("RESULT " + json.dumps({"results": results, "nbytes": nbytes}))
    mesh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4096, help="MLP width: the state is ~6 * width^2 floats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="ftrain-ckpt-bench-") as out:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            __file__,
            "--worker",
        ]
        cmd += ["--width", str(args.width), "--repeats", str(args.repeats), "--out", out]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"the 2-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        report = json.loads(line[len("RESULT ") :])
        manager = ftrain.ShardedCheckpointManager(Path(out) / "sharded", async_save=False)
        template = make_state(args.width)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            manager.restore_latest(template)
            times.append(time.perf_counter() - t)
        report["results"]["restore sharded -> plain, 1 process"] = statistics.median(times)
    gb = report["nbytes"] / 2**30
    print(f"state: {gb:.2f} GiB (params + Adam moments), 2 ranks, median of {args.repeats}")
    base = report["results"]["replicated, orbax on rank 0 only, sync"]
    for name, seconds in report["results"].items():
        print(f"{name:<52}{seconds:>8.3f} s{gb / seconds:>8.2f} GiB/s{base / seconds:>8.2f}x vs orbax rank 0")


if __name__ == "__main__":
    main()
