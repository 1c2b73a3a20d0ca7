"""Readable console output: a bar on a terminal, plain lines (one per interval) anywhere else (#16)."""

from __future__ import annotations

import io

import torch

import ftrain
from ftrain import actions, writers


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_fit(bar, log=None, steps=20):
    state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))

    def loss_fn(apply, params, buffers, batch, key):
        return apply(params, buffers, batch)[0].square().mean()

    step = ftrain.make_train_step(loss_fn, compile=False)
    ftrain.fit(state, step, [torch.ones(4, 2)] * steps, num_steps=steps, log_every=5, log=log, progress=False,
               actions=[bar])  # fmt: skip


def test_without_a_terminal_the_bar_prints_one_plain_line_per_interval():
    out = io.StringIO()
    run_fit(actions.ProgressBar(every=5, file=out))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()  # never redrawn
    assert [line.split()[1] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert all("step/s" in line and "loss=" in line and "grad_norm=" in line for line in lines)


def test_without_a_terminal_and_with_a_console_writer_only_the_console_prints():
    out = io.StringIO()
    run_fit(actions.ProgressBar(every=5, file=out), log=writers.Console(out))
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 5", "step 10", "step 15", "step 20"]


def test_on_a_terminal_the_bar_redraws_and_console_lines_print_above_it():
    out = Terminal()
    run_fit(actions.ProgressBar(every=5, file=out, mininterval=0), log=writers.Console(out))
    text = out.getvalue()
    assert "\r" in text and "20/20" in text  # a live bar
    console = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in console] == ["step 5", "step 10", "step 15", "step 20"]
