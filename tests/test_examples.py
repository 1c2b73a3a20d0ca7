"""Every example runs: `--help` works and a `--smoke` run (a few steps, tiny sizes, temp dir) succeeds."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
# Smoke runs are eager (each example's --smoke turns compile off) except digits.py, whose smoke run
# compiles its train step once. ddp.py (the mesh helper's) is compiled under torchrun by its own test;
# here it runs as one eager process.
# char_lm.py's smoke run also takes its --bf16 path (autocast inside the step, fp32 params).
EXTRA = {"ddp.py": ["--no-compile"], "char_lm.py": ["--bf16"]}
# What each example must report at the end of its run.
REPORTS = {
    "digits.py": "test accuracy",
    "cnn.py": "BatchNorm buffers updated by the steps: 9 of 9",
    "char_lm.py": "unigram baseline",
    "gan.py": "modes",
    "ensemble.py": "ensemble of 2: test accuracy",
    "lr_find.py": "suggested learning rate",
    "ddp.py": "val accuracy",
    "sweep.py": "best member",
    "finetune.py": "encoder weights unchanged after training: True",
}


def _run(args, timeout):
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_examples_are_there():
    expected = {"digits.py", "cnn.py", "char_lm.py", "gan.py", "ensemble.py", "lr_find.py"}
    assert expected <= set(EXAMPLES), f"missing examples: {sorted(expected - set(EXAMPLES))}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name):
    out = _run([f"examples/{name}", "--help"], timeout=120)
    assert "--smoke" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_smoke(name):
    out = _run([f"examples/{name}", "--smoke", *EXTRA.get(name, [])], timeout=600)
    assert REPORTS.get(name, "") in out, f"{name} --smoke did not report {REPORTS[name]!r}:\n{out[-2000:]}"
