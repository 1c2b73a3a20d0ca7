"""One training run for tests/test_resume.py: fit with checkpoints, resuming from what the directory holds.

    python tests/resume_script.py DIR NUM_STEPS [--kill-during-save STEP] [--step-sleep SECONDS]

Appends "step id id id ..." to DIR/batches.log after every step (the ids of the items in the step's
batch) and, when training completes, writes the final params to DIR/final.pt. With
``--kill-during-save STEP`` the process SIGKILLs itself while the async save of STEP is still being
written (its temporary directory exists, the step is not committed).
"""

import argparse
import glob
import os
import signal
import sys
import time

import torch
from torch import nn

import ftrain
from ftrain import optim, schedules

SAVE_EVERY = 5


class Items(torch.utils.data.Dataset):
    """96 items of 16 features; item i is (x_i, y_i, i), built from a fixed key (not the global RNG)."""

    def __init__(self):
        k1, k2 = ftrain.random.split(ftrain.random.key(1234))
        self.x = ftrain.random.normal(k1, (96, 16))
        self.y = ftrain.random.randint(k2, 0, 4, (96,))

    def __len__(self):
        return 96

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class RecordingLoader(ftrain.data.Loader):
    """Remembers the ids of the batch it yielded last, for the log."""

    def __iter__(self):
        for batch in super().__iter__():
            self.last_ids = batch[2].tolist()
            yield batch


class LogBatches:
    """After each step (and after the checkpoint action), log the step's batch; maybe die mid-save."""

    order = 200  # after ftrain.actions.Checkpoint (order 100)

    def __init__(self, directory, kill_during_save, step_sleep):
        self.log = open(os.path.join(directory, "batches.log"), "a")
        self.directory = directory
        self.kill_during_save = kill_during_save
        self.step_sleep = step_sleep

    def __call__(self, run):
        self.log.write(f"{run.step} {' '.join(map(str, run.data.last_ids))}\n")
        self.log.flush()
        if run.step == self.kill_during_save:
            deadline = time.monotonic() + 10
            while not glob.glob(os.path.join(self.directory, "ckpt", f"{run.step}.orbax-checkpoint-tmp*")):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no async save of step {run.step} in flight to kill")
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.step_sleep)  # gives the parent time to kill at a step of its choosing


def loss_fn(apply, params, buffers, batch, key):
    x, y, _ = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return nn.functional.cross_entropy(logits, y), {}, buffers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("num_steps", type=int)
    parser.add_argument("--kill-during-save", type=int, default=None)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)  # only the initial weights come from the global RNG
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    tx = optim.adamw(
        schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=5, decay_steps=args.num_steps), weight_decay=0.01
    )
    state = ftrain.TrainState.create(model, tx, key=ftrain.random.key(0))
    loader = RecordingLoader(Items(), batch_size=16, seed=7)  # 6 batches per epoch: resumes cross epochs
    manager = ftrain.CheckpointManager(os.path.join(args.directory, "ckpt"), save_every=SAVE_EVERY, keep=2)
    log = LogBatches(args.directory, args.kill_during_save, args.step_sleep)
    state = ftrain.fit(
        state,
        ftrain.make_train_step(loss_fn),
        loader,
        num_steps=args.num_steps,
        checkpoint=manager,
        actions=[log],
        progress=False,
        log=[],
    )
    manager.close()
    torch.save({k: v.clone() for k, v in state.params.items()}, os.path.join(args.directory, "final.pt"))
    print("done", int(state.step), flush=True)


if __name__ == "__main__":
    sys.exit(main())
