"""Data-parallel scaling on CPU: 1 process vs 2 processes (gloo), same global batch.

Launches this file under ``torchrun`` once per configuration, side by side in one run:

    1 process  x 1 thread    the baseline (one core)
    1 process  x 2 threads   the same two cores used by intra-op threads instead
    2 processes x 1 thread   ftrain.Mesh data parallel: each rank half of every global batch,
                             gradients all-reduced inside the compiled step

and prints the median step time, global samples/s and the scaling ratio (2 processes over
1 process x 1 thread; 2.0 would be perfect). Every configuration runs the same compiled
``ftrain.make_train_step`` on the same model and global batch.

    python benchmarks/mesh_scaling.py                  # default: MLP 1024-2048-2048-10, global batch 512
    python benchmarks/mesh_scaling.py --steps 10 --width 256     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ftrain  # noqa: E402


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x)
    return F.cross_entropy(logits, y), {}, buffers


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    mesh = ftrain.Mesh.from_env()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(args.width, 2 * args.width), nn.ReLU(), nn.Linear(2 * args.width, 2 * args.width), nn.ReLU(),
        nn.Linear(2 * args.width, 10),
    )  # fmt: skip
    state = mesh.replicate(ftrain.TrainState.create(model, ftrain.optim.adamw(1e-3)))
    step = ftrain.make_train_step(loss_fn, mesh=mesh)
    g = torch.Generator().manual_seed(0)
    batch = mesh.shard_batch(
        (torch.randn(args.batch, args.width, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
    )
    times = []
    for i in range(args.warmup + args.steps):
        mesh.barrier()  # every rank starts the step together: the slowest rank sets the pace
        t = time.perf_counter()
        state, metrics = step.donate(state, batch)
        float(metrics["loss"])  # host sync: the step has finished
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    # The gradient all-reduce alone (eager, same packing as inside the step): the price of data parallelism.
    comm = []
    for _ in range(5):
        mesh.barrier()
        t = time.perf_counter()
        reduced = mesh.pmean(state.params)
        float(next(iter(reduced.values())).sum())  # waits for the collective
        comm.append(time.perf_counter() - t)
    if mesh.is_main:
        result = {
            "median_s": statistics.median(times),
            "loss": float(metrics["loss"]),
            "comm_s": statistics.median(comm),
        }
        print("RESULT " + json.dumps(result))
    mesh.close()


def launch(nproc: int, threads: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        "--worker",
    ]
    cmd += ["--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--width", str(args.width), "--batch", str(args.batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{nproc} x {threads} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512, help="global batch")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = [(1, 1), (1, 2), (2, 1)]
    results = {c: launch(*c, args) for c in configs}
    print(f"MLP {args.width}-{2 * args.width}-{2 * args.width}-10, global batch {args.batch}, {args.steps} timed steps")
    print(f"{'config':<24}{'median step':>14}{'samples/s':>12}{'grad all-reduce':>18}{'final loss':>14}")
    for (nproc, threads), r in results.items():
        name = f"{nproc} proc x {threads} thread"
        comm = f"{r['comm_s'] * 1e3:.1f} ms" if nproc > 1 else "-"
        print(
            f"{name:<24}{r['median_s'] * 1e3:>11.1f} ms{args.batch / r['median_s']:>12.0f}{comm:>18}{r['loss']:>14.4e}"
        )
    print(
        f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the ratio needs an idle box)"
    )
    base, two_threads, two_procs = (results[c]["median_s"] for c in configs)
    print(f"scaling ratio, 2 processes vs 1 process x 1 thread: {base / two_procs:.2f}x (ideal 2.00x)")
    print(f"2 processes vs 1 process x 2 threads (same cores):  {two_threads / two_procs:.2f}x")


if __name__ == "__main__":
    main()
