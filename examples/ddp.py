"""Data-parallel (or sharded) training on an explicit device mesh, launched with torchrun.

The digits MLP of `examples/digits.py`, on every rank of a `ftrain.Mesh`: each rank reads its
own slice of every global batch, the gradients are averaged across ranks inside the one
compiled step, checkpoints are written by every rank in parallel (and resume at any world
size), and only rank 0 prints; the validation set is split over the ranks too. The same script
runs as one plain process, on CPU with gloo and on GPUs with NCCL. A SIGTERM (a scheduler's
preemption notice, passed on by torchrun) saves the step every rank reaches and exits with 143;
the same command resumes.

    torchrun --nproc-per-node 2 examples/ddp.py              # 2 CPU processes (gloo), data parallel
    torchrun --nproc-per-node 2 examples/ddp.py --fsdp 2     # params + optimizer state sharded (FSDP)
    torchrun --nproc-per-node 8 examples/ddp.py              # 8 GPUs: NCCL, one GPU per rank
    torchrun --nproc-per-node 8 --max-restarts 3 examples/ddp.py   # a lost rank restarts the job; it resumes
    python examples/ddp.py --steps 5                         # one process, five steps
    python examples/ddp.py --smoke                           # a few steps into a temp dir (CI)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128, help="the GLOBAL batch, split over the ranks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fsdp", type=int, default=1, help="shard params and optimizer state over this many ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ddp", help="checkpoints and logs go here (resumes from it)")
    parser.add_argument("--no-compile", action="store_true", help="run the step eagerly (for debugging)")
    parser.add_argument("--smoke", action="store_true", help="5 steps into a temp dir, for CI")
    args = parser.parse_args(argv)

    # Explicit: the mesh comes from torchrun's environment (one process without it).
    mesh = ftrain.Mesh.from_env(fsdp=args.fsdp)
    if args.smoke:
        args.steps = 5
        # every rank must agree on the directory: rank 0 picks it
        args.out = _broadcast(tempfile.mkdtemp(prefix="ftrain-ddp-") if mesh.is_main else "", mesh)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    train, val = ftrain.datasets.digits("train", seed=args.seed), ftrain.datasets.digits("val", seed=args.seed)
    mesh.check_batch_size(args.batch_size)  # a clear error on every rank if it does not split evenly
    loader = ftrain.data.Loader(train, args.batch_size, seed=args.seed, **mesh.loader_kwargs())

    lr = schedules.warmup_cosine_decay(0.0, args.lr, warmup_steps=max(1, args.steps // 20), decay_steps=args.steps)
    state = ftrain.TrainState.create(make_model().to(mesh.device), optim.adamw(lr), key=ftrain.random.key(args.seed))
    # Rank 0's initial values everywhere: replicated, or sharded over the fsdp axis.
    state = mesh.shard(state, axis="fsdp") if args.fsdp > 1 else mesh.replicate(state)

    train_step = ftrain.make_train_step(loss_fn, mesh=mesh, compile=not args.no_compile)
    manager = ftrain.ShardedCheckpointManager(args.out, mesh=mesh, save_every=max(1, args.steps // 4), keep=2)
    state = ftrain.fit(
        state,
        train_step,
        loader,
        num_steps=args.steps,
        checkpoint=manager,
        log=ftrain.writers.Console(),  # writers print on rank 0 only
        log_every=max(1, args.steps // 10),
        progress=mesh.is_main,
    )
    manager.close()

    # Evaluation on full (gathered) params, shared by the ranks: each evaluates its own slice of the
    # validation set (no item twice, none padded in) and the sums are reduced over the mesh.
    eval_step = ftrain.make_eval_step(loss_fn, compile=False, mesh=mesh)
    val_loader = ftrain.data.Loader(val, 256, shuffle=False, drop_last=False, **mesh.loader_kwargs())
    metrics = ftrain.evaluate(mesh.replicate(state), eval_step, val_loader)
    if mesh.is_main:
        print(
            f"{mesh}: val accuracy {metrics['acc']:.2%} (loss {metrics['loss']:.4f}) after {int(state.step)} steps, "
            f"{time.perf_counter() - start:.1f}s; checkpoints in {args.out}"
        )
    mesh.close()
    return metrics


def _broadcast(value: str, mesh: ftrain.Mesh) -> str:
    if not mesh.is_distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    main()
