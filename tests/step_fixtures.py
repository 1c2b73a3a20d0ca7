"""Shared compiled steps for the test suite (each distinct compiled function costs 10-60 s here).

``mlp_setup`` is a tiny classifier with (keyed) dropout, AdamW and a warmup-cosine schedule, with
its compiled ``train_step`` (pure and ``.donate``) and ``eval_step`` built once per session.
Loop and checkpoint tests can reuse it: ``def test_x(mlp_setup): state = mlp_setup.make_state()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import ftrain
from ftrain import optim, schedules


def mlp_loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    loss = nn.functional.cross_entropy(logits, y)
    return loss, {"accuracy": (logits.argmax(-1) == y).float().mean()}, buffers


def make_mlp_state(seed: int = 0) -> ftrain.TrainState:
    """A fresh 8-32-4 MLP state; the same seed gives the same state."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    tx = optim.adamw(schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=3, decay_steps=50), weight_decay=0.01)
    return ftrain.TrainState.create(net, tx, key=ftrain.random.key(seed))


def mlp_batches(n: int, batch_size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches ``(x float32 (B, 8), y int64 (B,))`` of a learnable problem."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, 8, generator=g)
        out.append((x, (x @ w).argmax(-1)))
    return out


@dataclasses.dataclass(frozen=True)
class MLPSetup:
    make_state: Callable[..., ftrain.TrainState]
    loss_fn: Callable[..., Any]
    batches: Callable[..., list]
    train_step: ftrain.TrainStep
    eval_step: ftrain.EvalStep


@pytest.fixture(scope="session")
def mlp_setup() -> MLPSetup:
    return MLPSetup(
        make_state=make_mlp_state,
        loss_fn=mlp_loss_fn,
        batches=mlp_batches,
        # Compiled in this process, not served from the step cache: tests count their compiles.
        train_step=ftrain.make_train_step(mlp_loss_fn, cache=False),
        eval_step=ftrain.make_eval_step(mlp_loss_fn, cache=False),
    )
