"""Exact resume: a run SIGKILLed at several points (one during an async save) and restarted until it
finishes ends bitwise equal to the uninterrupted run, having trained on the same batches.

Both runs are subprocesses of tests/resume_script.py: a compiled step (deterministic mode, fixed
threads), fit(..., checkpoint=CheckpointManager(save_every=5, keep=2)), a resumable Loader.
"""

import glob
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = str(Path(__file__).with_name("resume_script.py"))
NUM_STEPS = 40


def start(directory: Path, *extra: str) -> subprocess.Popen:
    directory.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(directory), str(NUM_STEPS), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def log_lines(directory: Path) -> list[tuple[int, list[int]]]:
    path = directory / "batches.log"
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(step), [int(i) for i in ids]) for step, *ids in lines]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def kill_after(proc: subprocess.Popen, directory: Path, step: int, committed: int, timeout: float = 240) -> None:
    """SIGKILL ``proc`` once its log shows ``step`` and checkpoint ``committed`` is complete.

    It sleeps a little per step, so it dies near ``step``. Waiting for the commit too keeps a loaded
    machine, where the async save can take longer than a few steps, from killing it before the save.
    """
    deadline = time.monotonic() + timeout
    while not (any(s >= step for s, _ in log_lines(directory)[-3:]) and committed in committed_steps(directory)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not reach step {step} in {timeout}s")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    finish(proc)


def committed_steps(directory: Path) -> list[int]:
    if not (directory / "ckpt").exists():
        return []
    return sorted(int(p.name) for p in (directory / "ckpt").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_killed_and_restarted_run_ends_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    run_a = start(a_dir)  # the uninterrupted run, in parallel with B's first attempt

    attempts = []  # (first step logged by the attempt, committed steps when it started)

    # B, attempt 1: killed from outside near step 8 (after the step-5 checkpoint).
    before = len(log_lines(b_dir))
    kill_after(start(b_dir, "--step-sleep", "0.05"), b_dir, 8, committed=5)
    attempts.append((log_lines(b_dir)[before][0], []))

    # Attempt 2: resumes, then dies by SIGKILL while the async save of step 20 is being written.
    committed, before = committed_steps(b_dir), len(log_lines(b_dir))
    code, _, err = finish(start(b_dir, "--kill-during-save", "20"))
    assert code == -signal.SIGKILL, err[-2000:]
    assert glob.glob(str(b_dir / "ckpt" / "20.orbax-checkpoint-tmp*")), "the kill did not land during the save"
    assert 20 not in committed_steps(b_dir) and 15 in committed_steps(b_dir)
    attempts.append((log_lines(b_dir)[before][0], committed))

    # Attempt 3: resumes from 15 (the half-written 20 is invisible), killed from outside near step 27.
    committed, before = committed_steps(b_dir), len(log_lines(b_dir))
    kill_after(start(b_dir, "--step-sleep", "0.05"), b_dir, 27, committed=25)
    attempts.append((log_lines(b_dir)[before][0], committed))

    # Attempt 4: resumes and runs to the end.
    committed, before = committed_steps(b_dir), len(log_lines(b_dir))
    code, out, err = finish(start(b_dir))
    assert code == 0 and f"done {NUM_STEPS}" in out, err[-3000:]
    attempts.append((log_lines(b_dir)[before][0], committed))

    code, out, err = finish(run_a)
    assert code == 0 and f"done {NUM_STEPS}" in out, err[-3000:]

    # Every restart resumed right after the newest committed checkpoint, not from scratch.
    for first_step, committed in attempts[1:]:
        assert committed and first_step == max(committed) + 1, attempts
    assert attempts[2][0] == 16  # attempt 3 resumed from 15: the killed save of 20 was not used

    # Batches: a replayed step saw the same batch as its first try, and B's steps saw A's batches.
    a_log, b_log = log_lines(a_dir), log_lines(b_dir)
    assert [s for s, _ in a_log] == list(range(1, NUM_STEPS + 1))
    b_seen: dict[int, list[int]] = {}
    for step, ids in b_log:
        assert b_seen.setdefault(step, ids) == ids, f"step {step} saw different batches on replay"
    assert b_seen == dict(a_log)
    assert len(b_log) > NUM_STEPS  # some steps really were replayed after the kills

    a_params = torch.load(a_dir / "final.pt")
    b_params = torch.load(b_dir / "final.pt")
    assert a_params.keys() == b_params.keys()
    for name in a_params:
        assert torch.equal(a_params[name], b_params[name]), f"params[{name!r}] differ after resume"
