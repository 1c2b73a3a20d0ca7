"""16 learning rates of the digits MLP: one vmapped sweep against 16 runs of one compiled step.

Both sides train the digits MLP (64-128-256-10, dropout 0.2, AdamW with an injected learning
rate, batch 64) for ``--steps`` steps per member through ``ftrain.fit``, on the same batches, in
this one process, with fixed threads:

- sequential: one ``make_train_step`` (compiled once, on the first run) reused by 16 runs, one
  state per learning rate;
- sweep: ``ftrain.sweep.create`` over the 16 learning rates and one ``sweep.train_step``: every
  member takes its step in the same compiled call, the batch shared.

Each side runs twice: the first time compiles (its wall time minus the steady one is the
compile), the second is the steady time. The totals count each side's compile once. The last
line is the steady ratio.

    python benchmarks/sweep.py [--members 16] [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, sweep


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 10),
    )  # fmt: skip


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y, label_smoothing=0.1), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the CPU time is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="steps per member")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train = ftrain.datasets.digits("train")
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=1e-2)
    rates = torch.logspace(-4, -1.5, args.members).tolist()
    settings = sweep.grid(learning_rate=rates)

    def fit(state, step):
        data = ftrain.data.Loader(train, args.batch_size, seed=0)
        state = ftrain.fit(state, step, data, num_steps=args.steps, progress=False)
        state.step.item()  # wait for the last step
        return state

    # Sequential: one compiled step, one fresh state per learning rate.
    seq_step = ftrain.make_train_step(loss_fn)

    def sequential():
        for lr in rates:
            torch.manual_seed(0)
            state = ftrain.TrainState.create(make_model(), tx, key=ftrain.random.key(0))
            fit(state.replace(opt_state=optim.set_hyperparams(state.opt_state, learning_rate=lr)), seq_step)

    sweep_step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False))

    def vmapped():
        fit(sweep.create(make_model, tx, settings), sweep_step)

    wall, cpu = {}, {}
    for name, fn in [("sequential, compiling", sequential), ("sequential", sequential),
                     ("sweep, compiling", vmapped), ("sweep", vmapped)]:  # fmt: skip
        wall[name], cpu[name] = timed(fn)
        print(f"  {name}: {wall[name]:.2f} s wall, {cpu[name]:.2f} s CPU", flush=True)
    n = args.members
    print(f"{n} members x {args.steps} steps, batch {args.batch_size}, {args.threads} threads; CPU seconds:")
    for side, runs in (("sequential", f"{n} runs"), ("sweep", "1 run")):
        first, steady = cpu[f"{side}, compiling"], cpu[side]
        print(f"{side + ':':<12}compile {first - steady:.1f} s + {runs} {steady:.2f} s = {first:.1f} s total")
    seq_total, sweep_total = cpu["sequential, compiling"], cpu["sweep, compiling"]
    print(f"with compiles: sweep {sweep_total:.1f} s vs sequential {seq_total:.1f} s ({seq_total / sweep_total:.2f}x)")
    speedup = cpu["sequential"] / cpu["sweep"]
    print(f"sweep speedup: {speedup:.2f}x ({n} members, one call vs {n} runs)")
    return speedup


if __name__ == "__main__":
    main()
