"""Worker for tests/test_dist_eval.py and the torchrun tests of tests/test_interrupts.py (2 gloo ranks).

Scenarios (first argument):
  eval   evaluate an odd-sized set on 2 ranks (evaluate(..., mesh=), the Evaluate action, a mesh-aware
         eval step) beside rank 0's 1-process evaluation; every rank records the ids it evaluated
  train  fit with a ShardedCheckpointManager, resuming from it; ``--kill-at K``: rank 1 SIGKILLs itself
         after step K in the job's first attempt (torchrun --max-restarts restarts the job)

Results go to ``--out``: ``*.json``, ``*.pt`` and per-rank logs that the tests read.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ftrain  # noqa: E402
from ftrain import optim  # noqa: E402

EVAL_ITEMS, TRAIN_ITEMS, FEATURES, BATCH = 37, 48, 8, 8


def items(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """(x, y, id) rows from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randn(n, 1, generator=g),
                                          torch.arange(n))  # fmt: skip


def make_state() -> ftrain.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))
    return ftrain.TrainState.create(model, optim.adam(1e-2), key=ftrain.random.key(0))


def loss_fn(apply, params, buffers, batch, key):
    x, y, ids = batch
    out, buffers = apply(params, buffers, x, key=key)
    n = torch.tensor(float(ids.shape[0]))
    return ((out - y) ** 2).mean(), {"n": n, "id_sum": ids.sum().double()}, buffers


SUMS = {"n": "sum", "id_sum": "sum"}


def scenario_eval(args) -> None:
    out, mesh = Path(args.out), ftrain.Mesh.from_env()
    rank = mesh.rank
    state = mesh.replicate(make_state())
    data = items(EVAL_ITEMS, seed=1)
    loader = ftrain.data.Loader(data, BATCH, shuffle=False, drop_last=False, **mesh.loader_kwargs())
    seen = []
    plain = ftrain.make_eval_step(loss_fn, compile=False)

    def recording(state, batch):
        seen.extend(batch[2].tolist())
        return plain(state, batch)

    report = {"evaluate": ftrain.evaluate(state, recording, loader, reductions=SUMS, mesh=mesh), "ids": seen}
    action = ftrain.actions.Evaluate(plain, loader, every=1, mesh=mesh, reductions=SUMS)
    run = ftrain.actions.Run(state, step=1)
    action(run)
    report["action"] = {k.split("/", 1)[1]: v for k, v in run.latest.items()}
    mesh_step = ftrain.make_eval_step(loss_fn, compile=False, mesh=mesh)  # a mesh-aware eval step
    report["mesh_step"] = ftrain.evaluate(state, mesh_step, loader, reductions=SUMS)
    if rank == 0:
        whole = ftrain.data.Loader(data, BATCH, shuffle=False, drop_last=False)
        report["single"] = ftrain.evaluate(make_state(), plain, whole, reductions=SUMS)
    (out / f"eval_rank{rank}.json").write_text(json.dumps(report))
    mesh.close()


class Progress:
    """Log every step per rank, sleep a little; maybe lose rank 1 in the job's first attempt."""

    order = 200

    def __init__(self, out: Path, rank: int, kill_at: int | None, step_sleep: float):
        self.log = open(out / f"steps_rank{rank}.log", "a")
        self.out, self.rank, self.kill_at, self.step_sleep = out, rank, kill_at, step_sleep

    def start(self, run) -> None:
        with open(self.out / f"starts_rank{self.rank}.txt", "a") as f:
            f.write(f"{run.step}\n")

    def __call__(self, run) -> None:
        self.log.write(f"{run.step}\n")
        self.log.flush()
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if run.step == self.kill_at and self.rank == 1 and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank lost mid-run, as on a real cluster
        time.sleep(self.step_sleep)


def scenario_train(args) -> None:
    out, mesh = Path(args.out), ftrain.Mesh.from_env()
    state = mesh.replicate(make_state())
    loader = ftrain.data.Loader(items(TRAIN_ITEMS, seed=2), BATCH * 2, seed=0, **mesh.loader_kwargs())
    manager = ftrain.ShardedCheckpointManager(out / "ckpt", mesh=mesh, save_every=args.save_every, keep=2)
    state = ftrain.fit(
        state,
        ftrain.make_train_step(loss_fn, mesh=mesh, compile=False),
        loader,
        num_steps=args.steps,
        checkpoint=manager,
        actions=[Progress(out, mesh.rank, args.kill_at, args.step_sleep)],
        progress=False,
        log=[],
    )
    manager.close()
    result = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    torch.save(ftrain.tree.map(torch.clone, result), out / f"final_rank{mesh.rank}.pt")
    mesh.close()


# ---------------------------------------------------------------- for the tests that launch this script


def torchrun(*args: str, restarts: int = 0, timeout: float = 240.0) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node 2 dist_worker.py *args`` in its own process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           f"--max-restarts={restarts}", __file__, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> tuple[int, str]:
    """Wait for a torchrun job; kill its whole process group if it hangs past ``timeout``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun hung past {timeout} s:\n{out[-4000:]}") from None
    return proc.returncode, out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["eval", "train"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a 2-core box
    {"eval": scenario_eval, "train": scenario_train}[args.scenario](args)
