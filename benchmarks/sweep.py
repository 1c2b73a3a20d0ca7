"""16 learning rates of the digits MLP: one vmapped sweep against 16 runs of one compiled step.

Both sides train the digits MLP (64-128-256-10, dropout 0.2, AdamW with an injected learning
rate, batch 64) for ``--steps`` steps per member through ``ftrain.fit``, on the same batches,
with fixed threads:

- sequential: one ``make_train_step`` (compiled once, on the first run) reused by 16 runs, one
  state per learning rate;
- sweep: ``ftrain.sweep.create`` over the 16 learning rates and one ``sweep.train_step``: every
  member takes its step in the same compiled call, the batch shared.

Each side runs in a fresh Python process of its own, with its own empty ftrain step cache and
inductor cache (``FTRAIN_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``, and ``TMPDIR``, where inductor
keeps its precompiled C++ header), so neither is served a compiled step or kernel from disk or
memory, and each pays torch's one-time start-up costs. In
its process a side runs twice: the first run compiles (its CPU time minus the steady run's is the
compile), the second is the steady time. CPU seconds count the side's process and every process
it waited for (the compiler's worker pool and its C++ compiles), from the start of the first run
to the end. The totals count each side's compile once; the last line is the steady ratio.

    python benchmarks/sweep.py [--members 16] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch._inductor.async_compile import shutdown_compile_workers

import ftrain
from ftrain import optim, sweep

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import digits  # noqa: E402  (the README example's model and loss_fn)


def make_model() -> nn.Module:
    return digits.make_model(0.2)


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_side(side: str, args: argparse.Namespace) -> dict[str, float]:
    """Train one side, twice (compiling, then steady), in this process; its timings in seconds."""
    torch.set_num_threads(args.threads)
    train = ftrain.datasets.digits("train")
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=1e-2)
    rates = torch.logspace(-4, -1.5, args.members).tolist()

    def fit(state, step):
        data = ftrain.data.Loader(train, args.batch_size, seed=0)
        state = ftrain.fit(state, step, data, num_steps=args.steps, progress=False)
        state.step.item()  # wait for the last step

    if side == "sequential":  # one compiled step, one fresh state per learning rate
        step = ftrain.make_train_step(digits.loss_fn)

        def once():
            for lr in rates:
                torch.manual_seed(0)
                state = ftrain.TrainState.create(make_model(), tx, key=ftrain.random.key(0))
                fit(state.replace(opt_state=optim.set_hyperparams(state.opt_state, learning_rate=lr)), step)

    else:
        step = sweep.train_step(ftrain.make_train_step(digits.loss_fn, compile=False))

        def once():
            fit(sweep.create(make_model, tx, sweep.grid(learning_rate=rates)), step)

    times = {}
    for run in ("first", "steady"):
        wall, cpu = time.perf_counter(), time.process_time()
        once()
        times[f"{run}_wall"], times[f"{run}_cpu"] = time.perf_counter() - wall, time.process_time() - cpu
    times["start_cpu"] = time.process_time() - times["first_cpu"] - times["steady_cpu"]  # imports, data
    shutdown_compile_workers()  # (reaped: their CPU time counts)
    return times


def measure(side: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one side in a fresh process with empty caches; add the CPU time of every process it waited for."""
    with tempfile.TemporaryDirectory(prefix=f"ftrain-bench-{side}-") as fresh:
        os.mkdir(f"{fresh}/tmp")  # (inductor's precompiled C++ header lives in the temp dir: fresh too)
        env = {**os.environ, "FTRAIN_CACHE_DIR": f"{fresh}/ftrain", "TORCHINDUCTOR_CACHE_DIR": f"{fresh}/inductor",
               "TMPDIR": f"{fresh}/tmp"}  # fmt: skip
        command = [sys.executable, __file__, "--side", side, *(f"--{k.replace('_', '-')}={v}" for k, v in
                   vars(args).items() if k != "side")]  # fmt: skip
        before = cpu_seconds(resource.RUSAGE_CHILDREN)
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        times = json.loads(out.strip().splitlines()[-1])
        times["all_cpu"] = cpu_seconds(resource.RUSAGE_CHILDREN) - before - times["start_cpu"]
    return times


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="steps per member")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", choices=["sequential", "sweep"], help=argparse.SUPPRESS)  # (one side, in-process)
    args = parser.parse_args(argv)
    if args.side is not None:
        print(json.dumps(run_side(args.side, args)))
        return 0.0

    n = args.members
    runs = {"sequential": f"{n} runs", "sweep": "1 run"}
    times = {}
    for side in runs:
        t = times[side] = measure(side, args)
        print(
            f"  {side}: compiling run {t['first_wall']:.1f} s wall, steady run {t['steady_wall']:.2f} s wall",
            flush=True,
        )
    print(f"{n} members x {args.steps} steps, batch {args.batch_size}, {args.threads} thread(s), "
          f"CPU {torch.backends.cpu.get_cpu_capability()}; CPU seconds:")  # fmt: skip
    for side, t in times.items():
        total, steady = t["all_cpu"] - t["steady_cpu"], t["steady_cpu"]
        compilers = t["all_cpu"] - t["first_cpu"] - steady  # the worker pool and the C++ compiles it ran
        print(f"{side + ':':<12}compile {total - steady:.1f} s + {runs[side]} {steady:.2f} s = {total:.1f} s total "
              f"(compiler processes {compilers:.1f} s of it)")  # fmt: skip
    seq_total, sweep_total = (times[s]["all_cpu"] - times[s]["steady_cpu"] for s in runs)
    print(f"with compiles: sweep {sweep_total:.1f} s vs sequential {seq_total:.1f} s ({seq_total / sweep_total:.2f}x)")
    speedup = times["sequential"]["steady_cpu"] / times["sweep"]["steady_cpu"]
    print(f"sweep speedup: {speedup:.2f}x ({n} members, one call vs {n} runs)")
    return speedup


if __name__ == "__main__":
    main()
