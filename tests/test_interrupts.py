"""Never lose work: Ctrl-C returns the state, an error carries it, preemption saves and exits 143,
checkpoints by wall clock, set_epoch on samplers, and nondeterminism cannot pass silently.

The subprocess tests run tests/interrupt_script.py (a tiny eager model, a resumable Loader, a
CheckpointManager) and signal it from outside at a random step; the rest run fit in-process on a
linear model with eager steps.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ftrain
from ftrain.actions import Run

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402
import interrupt_script as script  # noqa: E402

# ---------------------------------------------------------------- in-process: a tiny problem


def make_state() -> ftrain.TrainState:
    torch.manual_seed(0)
    return ftrain.TrainState.create(nn.Linear(3, 1), ftrain.optim.adam(0.05), key=ftrain.random.key(0))


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    out, _ = apply(params, buffers, x)
    return ((out - y) ** 2).mean()


STEP = ftrain.make_train_step(loss_fn, compile=False)
g = torch.Generator().manual_seed(0)
BATCHES = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5)]


def reference(num_steps: int) -> ftrain.TrainState:
    """The state of an uninterrupted run told to stop at ``num_steps``."""
    return ftrain.fit(make_state(), STEP, BATCHES, num_steps=num_steps, progress=False)


def same(a, b) -> bool:
    pick = lambda s: {"params": s.params, "opt_state": s.opt_state, "step": s.step}  # noqa: E731
    return ftrain.tree.equal(pick(a), pick(b))


class At:
    """An action that calls ``fn(run)`` once, after step ``step``; records what ``end`` saw."""

    def __init__(self, step, fn, order=0):
        self.step, self.fn, self.order = step, fn, order
        self.ended_with: str | None = "end() never ran"

    def __call__(self, run: Run) -> None:
        if run.step == self.step:
            self.fn(run)

    def end(self, run: Run) -> None:
        self.ended_with = run.stop_reason


class Signalling:
    """A train step that raises ``signum`` at ``step`` from inside the step (pure and donating variants)."""

    def __init__(self, step, *signums):
        self.step, self.signums = step, signums

    def _maybe(self, state):
        if int(state.step) + 1 == self.step:
            for s in self.signums:
                signal.raise_signal(s)

    def __call__(self, state, batch):
        out = STEP(state, batch)
        self._maybe(state)
        return out

    def donate(self, state, batch):
        self._maybe(state)  # before the step overwrites the state: the signal lands mid-step
        return STEP.donate(state, batch)


@pytest.fixture
def guarded():
    """Turn SIGINT/SIGTERM/SIGUSR1 that fit does not handle into a test failure (instead of ending pytest)."""

    def unhandled(signum, frame):
        raise AssertionError(f"fit did not handle {signal.Signals(signum).name}")

    before = {s: signal.signal(s, unhandled) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield unhandled
    for s, h in before.items():
        signal.signal(s, h)


def fit_catching_ctrl_c(*args, **kwargs):
    try:
        return ftrain.fit(*args, **kwargs)
    except KeyboardInterrupt:  # (raised out of the test, it would end the whole pytest session)
        pytest.fail("fit let the KeyboardInterrupt out instead of returning the state")


# ---------------------------------------------------------------- Ctrl-C


def test_sigint_inside_a_step_stops_at_the_step_boundary_and_returns_the_state(guarded):
    seen = At(None, None)
    state = fit_catching_ctrl_c(make_state(), Signalling(3, signal.SIGINT), BATCHES, num_steps=10, progress=False,
                       actions=[seen])  # fmt: skip
    assert int(state.step) == 3  # the step the signal landed in was finished, not thrown away
    assert same(state, reference(3))
    assert seen.ended_with == "interrupted"  # the actions' end ran and saw why


def test_keyboard_interrupt_between_steps_returns_the_state_and_saves_it(tmp_path):
    def ctrl_c(run):
        raise KeyboardInterrupt

    seen = At(3, ctrl_c)
    manager = ftrain.CheckpointManager(tmp_path, save_every=100)
    state = fit_catching_ctrl_c(make_state(), STEP, BATCHES, num_steps=10, checkpoint=manager, progress=False,
                                actions=[seen])  # fmt: skip
    assert int(state.step) == 3 and same(state, reference(3))
    assert seen.ended_with == "interrupted"
    assert manager.latest_step() == 3  # the final checkpoint, durable when fit returns
    restored, _ = manager.restore_latest(make_state())
    assert same(restored, state)
    manager.close()


def test_a_second_sigint_stops_at_once(guarded):
    with pytest.raises(KeyboardInterrupt) as info:
        ftrain.fit(make_state(), Signalling(3, signal.SIGINT, signal.SIGINT), BATCHES, num_steps=10, progress=False)
    assert int(info.value.state.step) == 2  # the last state known good: the step was cut short


def test_other_errors_finish_saves_flush_and_carry_the_last_good_state(tmp_path):
    class Flushes(ftrain.writers.Console):
        flushed = 0

        def flush(self):
            self.flushed += 1

    def broken():
        for i, batch in enumerate(BATCHES * 3):
            if i == 6:
                raise OSError("the data went away")
            yield batch

    writer = Flushes()
    manager = ftrain.CheckpointManager(tmp_path, save_every=3)  # async: the save of step 6 is under way
    with pytest.raises(OSError, match="the data went away") as info:
        ftrain.fit(make_state(), STEP, broken(), num_steps=10, checkpoint=manager, log=writer, progress=False)
    assert same(info.value.state, reference(6))  # usable: not donated, not poisoned
    assert writer.flushed >= 1
    assert manager.all_steps() == [3, 6]  # the save under way was completed; nothing new was written
    manager.close()


def test_an_error_inside_a_donating_step_carries_the_state_it_was_given():
    class Fails:
        def __call__(self, state, batch):
            return STEP(state, batch)

        def donate(self, state, batch):
            if int(state.step) == 4:
                raise RuntimeError("out of memory")
            return STEP.donate(state, batch)

    with pytest.raises(RuntimeError, match="out of memory") as info:
        ftrain.fit(make_state(), Fails(), BATCHES, num_steps=10, progress=False)
    assert same(info.value.state, reference(4))


# ---------------------------------------------------------------- preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_at_the_next_step_boundary_then_raises_preempted(tmp_path, guarded, signum):
    seen = At(None, None)
    manager = ftrain.CheckpointManager(tmp_path, save_every=100)
    with pytest.raises(ftrain.Preempted) as info:
        ftrain.fit(make_state(), Signalling(3, signum), BATCHES, num_steps=10, checkpoint=manager, progress=False,
                   actions=[seen])  # fmt: skip
    assert isinstance(info.value, SystemExit) and info.value.code == 128 + signum
    assert int(info.value.state.step) == 3 and same(info.value.state, reference(3))
    assert manager.latest_step() == 3  # durable before fit raised
    assert "preempted" in seen.ended_with
    assert signal.getsignal(signum) is guarded  # the previous handler is back
    manager.close()


def test_preemption_signals_are_configurable_and_need_a_checkpoint_manager(tmp_path, guarded):
    handlers = {}

    def look(run):
        handlers.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)})

    ftrain.fit(make_state(), STEP, BATCHES, num_steps=2, progress=False, actions=[At(1, look)])
    assert handlers[signal.SIGTERM] is guarded and handlers[signal.SIGUSR1] is guarded  # no manager: untouched
    assert handlers[signal.SIGINT] is not guarded  # Ctrl-C is handled either way

    manager = ftrain.CheckpointManager(tmp_path, preemption_signals=[signal.SIGUSR1])
    ftrain.fit(make_state(), STEP, BATCHES, num_steps=2, checkpoint=manager, progress=False, actions=[At(1, look)])
    assert handlers[signal.SIGTERM] is guarded and handlers[signal.SIGUSR1] is not guarded
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        assert signal.getsignal(s) is guarded  # every previous handler is back
    manager.close()
    with pytest.raises(ValueError, match="preemption_signals"):
        ftrain.CheckpointManager(tmp_path, preemption_signals=["SIGTERM"])


# ---------------------------------------------------------------- checkpoints by wall clock


def test_save_every_seconds_saves_by_wall_clock(tmp_path):
    sleepy = ftrain.actions.Periodic(lambda run: time.sleep(0.1), every=1)
    manager = ftrain.CheckpointManager(tmp_path, save_every_seconds=0.35, async_save=False, keep=None)
    ftrain.fit(make_state(), STEP, BATCHES, num_steps=12, checkpoint=manager, progress=False, actions=[sleepy])
    saved = manager.all_steps()
    assert 1 < len(saved) < 12 and saved[-1] == 12, saved  # every few steps, and the final state
    manager.close()
    with pytest.raises(ValueError, match="save_every_seconds"):
        ftrain.CheckpointManager(tmp_path / "bad", save_every_seconds=0)


def test_save_every_seconds_combines_with_save_every_and_restarts_the_clock_at_each_save(tmp_path, monkeypatch):
    manager = ftrain.CheckpointManager(tmp_path, save_every=10, save_every_seconds=60, async_save=False, keep=None)
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    state, fired = make_state(), []
    for step in range(1, 25):
        now[0] += 8.0  # 8 s a step; the clock starts at the first step
        if manager.should_save(step):
            fired.append(step)
            manager.save(state.replace(step=torch.tensor(step)))
    assert fired == [9, 10, 18, 20], fired  # 60 s after step 1, save_every, 60 s after step 10, save_every
    manager.close()


# ---------------------------------------------------------------- distributed samplers


def test_fit_calls_set_epoch_on_a_dataloader_sampler():
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    epochs = []
    set_epoch = sampler.set_epoch
    sampler.set_epoch = lambda e: (epochs.append(e), set_epoch(e))
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    ftrain.fit(make_state(), ftrain.make_train_step(loss_fn, compile=False), loader, num_epochs=3, progress=False)
    assert epochs == [0, 1, 2]


# ---------------------------------------------------------------- nondeterminism cannot pass silently


def dropout_state() -> ftrain.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    return ftrain.TrainState.create(model, ftrain.optim.sgd(0.1), key=ftrain.random.key(0))


def test_dropout_without_key_inside_a_step_is_keyed_by_the_step():
    def forgets_the_key(apply, params, buffers, batch, key):
        x, y = batch
        out, _ = apply(params, buffers, x)  # no key=key
        return ((out - y) ** 2).mean()

    def passes_the_key(apply, params, buffers, batch, key):
        x, y = batch
        out, _ = apply(params, buffers, x, key=key)
        return ((out - y) ** 2).mean()

    batch = BATCHES[0]
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # the global RNG must not matter
        results.append(ftrain.make_train_step(forgets_the_key, compile=False)(dropout_state(), batch)[0])
    keyed, _ = ftrain.make_train_step(passes_the_key, compile=False)(dropout_state(), batch)
    assert same(results[0], results[1])
    assert same(results[0], keyed)  # forgetting key= gives what passing it gives


def bn_state() -> ftrain.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    return ftrain.TrainState.create(model, ftrain.optim.sgd(0.1))


def drops_buffers(apply, params, buffers, batch, key):
    x, y = batch
    out, new_buffers = apply(params, buffers, x)  # the new running stats, then not returned
    return ((out - y) ** 2).mean(), {}


@pytest.mark.parametrize("compile", [False, True])  # compiled: caught by the fake-tensor check, before compiling
def test_a_loss_fn_that_drops_new_buffers_raises_a_step_error(compile):
    step = ftrain.make_train_step(drops_buffers, compile=compile)
    with pytest.raises(ftrain.StepError, match=r"running_mean.*return loss, metrics, new_buffers"):
        step(bn_state(), BATCHES[0])


class Scaled(nn.Module):
    """A model whose buffer is a constant (no forward writes it)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.linear(x) * self.scale


def test_a_loss_fn_may_omit_buffers_that_apply_did_not_update():
    metrics = ftrain.make_eval_step(drops_buffers, compile=False)(bn_state(), BATCHES[0])  # eval mode: no update
    assert "loss" in metrics
    state = ftrain.TrainState.create(Scaled(), ftrain.optim.sgd(0.1))
    state, _ = ftrain.make_train_step(loss_fn, compile=False)(state, BATCHES[0])
    assert int(state.step) == 1


# ---------------------------------------------------------------- subprocesses, signalled from outside


def committed(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in (directory / "ckpt").iterdir() if p.name.isdigit())


def restored_step(directory: Path) -> int:
    manager = ftrain.CheckpointManager(directory / "ckpt", async_save=False)
    try:
        state, _ = manager.restore_latest(script.make_state())
        return int(state.step)
    finally:
        manager.close()


def finished(proc, directory, code=0):
    proc.wait(timeout=180)
    assert proc.returncode == code, script.output(directory, proc)


@pytest.mark.slow
def test_sigint_at_a_random_step_returns_what_a_run_stopped_there_returns(tmp_path):
    target = random.Random(os.urandom(8)).randint(3, 14)
    run = tmp_path / "interrupted"
    proc = script.start(run, 40, "--step-sleep", "0.05")
    script.wait_for_step(proc, run, target)
    proc.send_signal(signal.SIGINT)
    finished(proc, run)
    got = script.result(run)
    stopped = int(got["state"]["step"])
    assert got["stop_reason"] == "interrupted" and target <= stopped < 40, (target, stopped)

    ref = tmp_path / "reference"
    finished(script.start(ref, stopped), ref)
    assert ftrain.tree.equal(got["state"], script.result(ref)["state"]), f"interrupted at {stopped} (target {target})"

    manager = ftrain.CheckpointManager(run / "ckpt", async_save=False)
    assert manager.latest_step() == stopped  # the checkpoint written at the interrupt...
    state, _ = manager.restore_latest(script.make_state())
    restored = {"params": state.params, "buffers": state.buffers, "opt_state": state.opt_state, "step": state.step}
    assert ftrain.tree.equal(restored, got["state"])  # ...restores the returned state
    manager.close()


@pytest.mark.slow
def test_sigterm_at_random_moments_exits_143_after_a_durable_checkpoint_and_resumes_bitwise(tmp_path):
    rng = random.Random(os.urandom(8))
    n = 30
    a, b = tmp_path / "a", tmp_path / "b"
    uninterrupted = script.start(a, n)  # in parallel with b's first attempts

    starts = []  # (first step an attempt logged, the latest committed step when it started)

    def attempt(*extra, signal_at=None):
        before, latest = len(script.logged_steps(b)), (committed(b)[-1] if (b / "ckpt").exists() else 0)
        proc = script.start(b, n, *extra)
        if signal_at is not None:
            script.wait_for_step(proc, b, signal_at)
            time.sleep(rng.uniform(0, 0.06))  # somewhere in a step, an action, the data or a save
            proc.send_signal(signal.SIGTERM)
        finished(proc, b, code=143 if signal_at is not None or "--signal-during-save" in extra else 0)
        starts.append((script.logged_steps(b)[before], latest))
        if proc.returncode == 143:  # exited the way schedulers expect, after a durable checkpoint
            last = script.logged_steps(b)[-1]
            assert committed(b)[-1] == last and restored_step(b) == last, (committed(b), last)

    attempt("--step-sleep", "0.05", signal_at=rng.randint(2, 7))
    attempt("--signal-during-save", "12")  # SIGTERM while the async save of step 12 is being written
    attempt("--step-sleep", "0.05", "--sync", signal_at=rng.randint(15, 22))
    attempt()
    finished(uninterrupted, a)

    for first, latest in starts:
        assert first == latest + 1, starts  # each restart resumed right after the preemption's checkpoint
    assert ftrain.tree.equal(script.result(a)["state"], script.result(b)["state"]), starts


# ---------------------------------------------------------------- torchrun: 2 gloo ranks

TORCHRUN_STEPS = "12"


def rank_steps(out: Path, rank: int) -> list[int]:
    path = out / f"steps_rank{rank}.log"
    return [int(s) for s in path.read_text().split()] if path.exists() else []


def starts(out: Path, rank: int) -> list[int]:
    return [int(s) for s in (out / f"starts_rank{rank}.txt").read_text().split()]


def finals(out: Path) -> list[dict]:
    return [torch.load(out / f"final_rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted_torchrun(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("torchrun_reference")
    code, log = dist_worker.finish(dist_worker.torchrun("train", "--out", str(out), "--steps", TORCHRUN_STEPS))
    assert code == 0, log[-4000:]
    return finals(out)


@pytest.mark.slow
def test_torchrun_restarts_a_job_that_lost_a_rank_and_it_ends_bitwise_equal(tmp_path, uninterrupted_torchrun):
    job = dist_worker.torchrun("train", "--out", str(tmp_path), "--steps", TORCHRUN_STEPS, "--kill-at", "5",
                               "--step-sleep", "0.05", restarts=1)  # fmt: skip
    code, log = dist_worker.finish(job)
    assert code == 0, log[-4000:]  # the restarted attempt finished the job
    for rank in (0, 1):
        first, resumed = starts(tmp_path, rank)
        assert first == 0 and resumed in (2, 4), starts(tmp_path, rank)  # 4 unless its async commit lost the race
    assert starts(tmp_path, 0) == starts(tmp_path, 1)
    for got, expected in zip(finals(tmp_path), uninterrupted_torchrun):
        assert ftrain.tree.equal(got, expected)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_every_rank_at_one_step_and_the_relaunch_ends_bitwise_equal(
    tmp_path, uninterrupted_torchrun
):
    target = random.Random(os.urandom(8)).randint(2, 7)
    job = dist_worker.torchrun("train", "--out", str(tmp_path), "--steps", TORCHRUN_STEPS, "--save-every", "1000",
                               "--step-sleep", "0.1")  # fmt: skip
    deadline = time.monotonic() + 180
    while not (len(rank_steps(tmp_path, 0)) >= target and len(rank_steps(tmp_path, 1)) >= target):
        assert job.poll() is None and time.monotonic() < deadline, dist_worker.finish(job)[1][-4000:]
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGTERM)  # the scheduler preempts the job: torchrun passes it on to every rank
    dist_worker.finish(job)
    last = rank_steps(tmp_path, 0)[-1]
    assert rank_steps(tmp_path, 1)[-1] == last < int(TORCHRUN_STEPS)  # the ranks agreed on where to stop
    committed = [
        int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit() and (p / "ftrain.json").is_file()
    ]
    assert max(committed) == last, (committed, last)  # saved there, on every rank, before exiting

    code, log = dist_worker.finish(dist_worker.torchrun("train", "--out", str(tmp_path), "--steps", TORCHRUN_STEPS))
    assert code == 0, log[-4000:]
    assert starts(tmp_path, 0) == starts(tmp_path, 1) == [0, last]
    for got, expected in zip(finals(tmp_path), uninterrupted_torchrun):
        assert ftrain.tree.equal(got, expected)
