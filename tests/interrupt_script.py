"""One training run for tests/test_interrupts.py and tests/test_crash_cleanup.py, signalled from outside.

    python tests/interrupt_script.py DIR NUM_STEPS [--step-sleep S] [--workers N] [--local-dataset]
        [--save-every K] [--sync] [--signal-during-save STEP] [--no-checkpoint]

fit(...) trains a tiny eager MLP (BatchNorm, keyed dropout) on a resumable Loader, with a
CheckpointManager in DIR/ckpt (resuming from it). After every step (after the checkpoint action)
it appends "step pid" to DIR/steps.log and sleeps ``--step-sleep`` seconds, so a test can signal it
at a step of its choosing. When fit returns, the final state goes to DIR/result.pt with the
run's stop reason, and the script prints "done STEP REASON". ``--signal-during-save STEP`` makes
the process SIGTERM itself while the async save of STEP is still being written.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import time

import torch
from torch import nn

import ftrain
from ftrain import optim, schedules

ITEMS, FEATURES, CLASSES, BATCH = 96, 8, 3, 16  # 6 batches an epoch: runs cross epochs


class Items(torch.utils.data.Dataset):
    """Item i is (x_i, y_i), built from a fixed key (not the global RNG)."""

    def __init__(self):
        k1, k2 = ftrain.random.split(ftrain.random.key(1234))
        self.x = ftrain.random.normal(k1, (ITEMS, FEATURES))
        self.y = ftrain.random.randint(k2, 0, CLASSES, (ITEMS,))

    def __len__(self):
        return ITEMS

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def local_dataset() -> torch.utils.data.Dataset:
    """The same items from a class defined inside a function (plain pickle cannot send it to workers)."""

    class LocalItems(torch.utils.data.Dataset):
        def __init__(self):
            self.items = Items()

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    return LocalItems()


def make_state() -> ftrain.TrainState:
    torch.manual_seed(0)  # only the initial weights come from the global RNG
    model = nn.Sequential(
        nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, CLASSES)
    )
    # A schedule that does not depend on NUM_STEPS: a run stopped at step k is a prefix of a longer one.
    tx = optim.adamw(schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=5, decay_steps=200), weight_decay=0.01)
    return ftrain.TrainState.create(model, tx, key=ftrain.random.key(0))


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return nn.functional.cross_entropy(logits, y), {}, buffers


class Progress:
    """After each step (after ftrain's Checkpoint action): log it, maybe signal ourselves mid-save, sleep."""

    order = 200

    def __init__(self, directory: str, step_sleep: float, signal_during_save: int | None):
        self.log = open(os.path.join(directory, "steps.log"), "a")
        self.directory = directory
        self.step_sleep = step_sleep
        self.signal_during_save = signal_during_save
        self.stop_reason = None

    def __call__(self, run):
        self.log.write(f"{run.step} {os.getpid()}\n")
        self.log.flush()
        if run.step == self.signal_during_save:
            pattern = os.path.join(self.directory, "ckpt", f"{run.step}.orbax-checkpoint-tmp*")
            deadline = time.monotonic() + 10
            while not glob.glob(pattern):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no async save of step {run.step} in flight to signal during")
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGTERM)  # lands while orbax still writes the step
        time.sleep(self.step_sleep)

    def end(self, run):
        self.stop_reason = run.stop_reason


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("num_steps", type=int)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--local-dataset", action="store_true")
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--sync", action="store_true", help="synchronous saves")
    parser.add_argument("--signal-during-save", type=int, default=None)
    parser.add_argument("--no-checkpoint", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.directory, exist_ok=True)

    dataset = local_dataset() if args.local_dataset else Items()
    loader = ftrain.data.Loader(dataset, BATCH, seed=7, num_workers=args.workers)
    manager = None
    if not args.no_checkpoint:
        manager = ftrain.CheckpointManager(
            os.path.join(args.directory, "ckpt"), save_every=args.save_every, keep=3, async_save=not args.sync
        )
    progress = Progress(args.directory, args.step_sleep, args.signal_during_save)
    state = ftrain.fit(
        make_state(),
        ftrain.make_train_step(loss_fn, compile=False),
        loader,
        num_steps=args.num_steps,
        checkpoint=manager,
        actions=[progress],
        progress=False,
        log=[],
    )
    if manager is not None:
        manager.close()
    result = {"params": state.params, "buffers": state.buffers, "opt_state": state.opt_state, "step": state.step}
    torch.save({"state": ftrain.tree.map(torch.clone, result), "stop_reason": progress.stop_reason},
               os.path.join(args.directory, "result.pt"))  # fmt: skip
    print("done", int(state.step), progress.stop_reason, flush=True)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- for the tests that start this script


def start(directory, num_steps: int, *extra: str, env: dict | None = None):
    """Start this script on ``directory``; its stdout/stderr go to files there (a pipe could outlive it)."""
    import subprocess
    import sys
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    attempt = len(list(directory.glob("stderr.*")))
    with open(directory / f"stdout.{attempt}", "w") as out, open(directory / f"stderr.{attempt}", "w") as err:
        return subprocess.Popen(
            [sys.executable, __file__, str(directory), str(num_steps), *extra],
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
        )


def output(directory, proc) -> str:
    """What the latest attempt printed (stdout then stderr), for assertion messages."""
    from pathlib import Path

    directory = Path(directory)
    attempt = len(list(directory.glob("stderr.*"))) - 1
    return (directory / f"stdout.{attempt}").read_text() + (directory / f"stderr.{attempt}").read_text()[-3000:]


def logged_steps(directory) -> list[int]:
    from pathlib import Path

    path = Path(directory) / "steps.log"
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(proc, directory, step: int, timeout: float = 120.0) -> None:
    """Return once the run in ``directory`` has logged ``step`` (or later)."""
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in logged_steps(directory)[-3:]):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{output(directory, proc)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not reach step {step} in {timeout}s")
        time.sleep(0.005)


def result(directory) -> dict:
    from pathlib import Path

    return torch.load(Path(directory) / "result.pt", weights_only=False)
