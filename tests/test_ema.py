"""EMA weights you can use: decay warm-up, a start step, evaluation and export from the average (#16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ftrain
from ftrain import optim


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    return nn.functional.mse_loss(apply(params, buffers, x)[0], y)


def problem():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64))
    return nn.Linear(3, 1).double(), batch


def train(tx, steps=6):
    net, batch = problem()
    state = ftrain.TrainState.create(net, tx)
    step = ftrain.make_train_step(loss_fn, compile=False)
    history = []  # the params after each update
    for _ in range(steps):
        state, _ = step(state, batch)
        history.append({k: v.clone() for k, v in state.params.items()})
    return state, history, batch


def hand_ema(history, decay, start_step=0, warmup=False):
    ema = None
    for count, params in enumerate(history):  # count: updates before this one
        if count <= start_step:
            ema = dict(params)
            continue
        n = count - start_step
        rate = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = {k: rate * ema[k] + (1 - rate) * params[k] for k in params}
    return ema


@pytest.mark.parametrize("start_step,warmup", [(0, False), (2, False), (0, True), (1, True)])
def test_ema_equals_a_hand_computed_average(start_step, warmup):
    decay = 0.8
    state, history, _ = train(
        optim.chain(optim.sgd(0.3), optim.ema_params(decay, start_step=start_step, warmup=warmup))
    )
    expected = hand_ema(history, decay, start_step, warmup)
    assert ftrain.tree.allclose(optim.ema_state(state).params, expected, rtol=1e-12, atol=1e-12)


def test_evaluating_and_exporting_the_ema_weights(tmp_path):
    state, history, batch = train(optim.chain(optim.sgd(0.3), optim.ema_params(0.8, warmup=True)))
    eval_step = ftrain.make_eval_step(loss_fn, compile=False)
    ema = optim.ema_state(state)
    raw_loss = ftrain.evaluate(state, eval_step, [batch])["loss"]
    ema_loss = ftrain.evaluate(ema, eval_step, [batch])["loss"]
    by_hand = state.replace(params=hand_ema(history, 0.8, warmup=True))
    assert ema_loss != pytest.approx(raw_loss)  # the average is not the last params
    assert ema_loss == pytest.approx(ftrain.evaluate(by_hand, eval_step, [batch])["loss"], rel=1e-12)
    module = ema.to_module()
    assert torch.equal(module.weight.detach(), ema.params["weight"])
    pytest.importorskip("safetensors")
    ftrain.checkpoint.save_safetensors(ema, tmp_path / "ema.safetensors")
    loaded = ftrain.checkpoint.load_safetensors(tmp_path / "ema.safetensors")
    assert torch.equal(loaded["weight"], ema.params["weight"]) and not torch.equal(
        loaded["weight"], state.params["weight"]
    )


def test_ema_state_needs_exactly_one_average():
    net, _ = problem()
    with pytest.raises(ValueError, match="holds 0 optim.ema_params averages"):
        optim.ema_state(ftrain.TrainState.create(net, optim.sgd(0.1)))
    with pytest.raises(ValueError, match="start_step must be a non-negative int"):
        optim.ema_params(0.9, start_step=-1)
