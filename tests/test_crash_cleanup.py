"""Crash clean-up: a killed trainer leaves no Loader worker or helper process behind, and a Dataset
defined inside a function loads in workers beside a CheckpointManager (jax loaded: forkserver).

The trainer is tests/interrupt_script.py. Every process it starts inherits a marker in its
environment, which is how the test finds them in /proc after the trainer is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

import ftrain

sys.path.insert(0, str(Path(__file__).parent))
import interrupt_script as script  # noqa: E402

pytestmark = pytest.mark.slow

MARKER = "FTRAIN_CRASH_CLEANUP_TEST"


def marked(token: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries ``MARKER=token``."""
    needle = f"{MARKER}={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_loader_worker_or_helper_outlives_a_killed_trainer(tmp_path):
    token = uuid.uuid4().hex
    proc = script.start(tmp_path, 500, "--workers", "2", "--step-sleep", "0.05", env={MARKER: token})
    try:
        script.wait_for_step(proc, tmp_path, 3)
        helpers = {pid: cmd for pid, cmd in marked(token).items() if pid != proc.pid}
        assert len(helpers) >= 3, helpers  # the forkserver and the two workers, at least
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while marked(token) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = marked(token)
        assert not left, f"alive 10 s after the trainer was killed: {left}"
    finally:
        for pid in marked(token):  # leave nothing behind when the test fails
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_a_dataset_defined_inside_a_function_loads_in_workers_beside_a_checkpoint_manager(tmp_path):
    local, plain = tmp_path / "local", tmp_path / "plain"
    runs = [
        (local, script.start(local, 8, "--workers", "2", "--local-dataset")),  # 8 steps: two epochs' workers
        (plain, script.start(plain, 8)),  # the same run, loading in the trainer
    ]
    for directory, proc in runs:
        proc.wait(timeout=180)
        assert proc.returncode == 0, script.output(directory, proc)
    assert ftrain.tree.equal(script.result(local)["state"], script.result(plain)["state"])
