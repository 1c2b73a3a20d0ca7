"""The default step metrics: grad_norm and lr, computed inside the step (#16)."""

from __future__ import annotations

import json

import pytest
import torch
from step_fixtures import make_mlp_state, mlp_batches
from torch import nn

import ftrain
from ftrain import optim, schedules


def linear_loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    return nn.functional.mse_loss(apply(params, buffers, x)[0], y)


def linear_problem(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g))
    return net, batch


def torch_grad_norm(net: nn.Module, batch) -> float:
    """The global gradient norm by plain autograd, as ``clip_grad_norm_`` returns it."""
    net.zero_grad()
    nn.functional.mse_loss(net(batch[0]), batch[1]).backward()
    return float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))


@pytest.mark.parametrize("clip_first", [False, True])
def test_grad_norm_and_lr_equal_autograd_and_the_schedule(clip_first):
    net, batch = linear_problem()
    schedule = schedules.linear(0.1, 0.0, transition_steps=10)
    tx = optim.sgd(schedule, momentum=0.9)
    tx = optim.chain(optim.clip_by_global_norm(1e6), tx) if clip_first else tx
    state = ftrain.TrainState.create(net, tx)
    step = ftrain.make_train_step(linear_loss_fn, compile=False)
    for i in range(3):
        expected = torch_grad_norm(state.to_module(), batch)  # autograd on this step's params
        state, metrics = step(state, batch)
        assert sorted(metrics) == ["grad_norm", "loss", "lr"]
        assert float(metrics["grad_norm"]) == pytest.approx(expected, rel=1e-6)
        assert float(metrics["lr"]) == pytest.approx(0.1 * (1 - i / 10), rel=1e-6)  # the lr this update used
        assert metrics["grad_norm"].dtype == metrics["lr"].dtype == torch.float32


def test_clip_by_global_norm_reports_its_norm_only_when_it_sees_the_raw_gradients():
    grads = {"w": torch.tensor([3.0, 4.0])}
    first = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1))
    later = optim.chain(optim.adam(0.1), optim.clip_by_global_norm(1.0))
    _, reported = optim.record(first.update, grads, first.init(grads), grads, gradients=grads)
    assert float(reported["grad_norm"]) == 5.0  # the clip's own norm, not a second reduction
    _, reported = optim.record(later.update, grads, later.init(grads), grads, gradients=grads)
    assert sorted(reported) == ["lr"]  # the clip there saw Adam's directions: not the gradient norm
    # train_core then computes the norm of the raw gradients itself: the metric is the same either way
    net, batch = linear_problem()
    state = ftrain.TrainState.create(net, optim.chain(optim.adam(0.1), optim.clip_by_global_norm(1e-3)))
    _, metrics = ftrain.make_train_step(linear_loss_fn, compile=False)(state, batch)
    assert float(metrics["grad_norm"]) == pytest.approx(torch_grad_norm(state.to_module(), batch), rel=1e-6)


def test_one_lr_per_partition_group_and_injected_hyperparameters_follow_set_hyperparams():
    net, batch = linear_problem()
    tx = optim.partition(
        {
            "w": optim.sgd(0.5),
            "b": optim.inject_hyperparams(optim.adam)(learning_rate=0.01),
            "off": optim.set_to_zero(),
        },
        {"weight": "w", "bias": "b"},
    )
    state = ftrain.TrainState.create(net, tx)
    step = ftrain.make_train_step(linear_loss_fn, compile=False)
    state, metrics = step(state, batch)
    assert sorted(metrics) == ["grad_norm", "loss", "lr/b", "lr/w"]
    assert float(metrics["lr/w"]) == 0.5 and float(metrics["lr/b"]) == pytest.approx(0.01)
    state = state.replace(opt_state=optim.set_hyperparams(state.opt_state, learning_rate=0.003))
    _, metrics = step(state, batch)
    assert float(metrics["lr/b"]) == pytest.approx(0.003)


@pytest.mark.parametrize(
    "tx", [optim.adamw(0.05), optim.chain(optim.clip_by_global_norm(1e6), optim.sgd(0.05))], ids=["fused", "chain"]
)
@pytest.mark.parametrize("donate", [False, True])
def test_a_constant_lr_is_one_tensor_across_eager_steps_until_something_writes_into_it(tx, donate):
    """Eager, the lr metric of a constant learning rate is built once, not every step; a metric someone
    wrote into in place is never handed out again, so every step's lr still reads the rate."""
    net, batch = linear_problem()
    state = ftrain.TrainState.create(net, tx)
    step = ftrain.make_train_step(linear_loss_fn, compile=False)
    run = step.donate if donate else step
    state, first = run(state, batch)
    state, second = run(state, batch)
    assert second["lr"] is first["lr"] and float(second["lr"]) == pytest.approx(0.05)
    first["lr"].add_(1.0)  # (a caller's in-place op on a metric)
    _, third = run(state, batch)
    assert third["lr"] is not first["lr"] and float(third["lr"]) == pytest.approx(0.05)


def test_an_lr_reported_under_inference_mode_is_not_the_cached_one():
    """Inference tensors keep no version counter: one cached there could not be checked later."""
    grads = {"w": torch.ones(2)}
    tx = optim.sgd(0.125)
    with torch.inference_mode():
        _, inside = optim.record(tx.update, grads, tx.init(grads), gradients=grads)
    _, outside = optim.record(tx.update, grads, tx.init(grads), gradients=grads)
    _, again = optim.record(tx.update, grads, tx.init(grads), gradients=grads)
    assert inside["lr"].is_inference() and not outside["lr"].is_inference()
    assert again["lr"] is outside["lr"] and float(again["lr"]) == 0.125


def test_a_traced_step_builds_its_lr_in_the_graph_not_as_a_cached_tensor():
    """Under a dispatch mode (make_fx, fake tensors) the lr is a factory op of the trace: a cached
    real tensor there would be a tensor constant, which make_fx and export cannot lift."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    net, batch = linear_problem()
    state = ftrain.TrainState.create(net, optim.adamw(1e-3))
    step = ftrain.make_train_step(linear_loss_fn, compile=False)
    step(state, batch)  # (an eager step first: the eager lr tensor is cached now)
    graph = make_fx(step.core)(state, batch)
    assert not [name for name in vars(graph) if name.startswith("_tensor_constant")]
    assert any(node.target is torch.ops.aten.full.default for node in graph.graph.nodes)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _, metrics = step.core(state, batch)
    assert isinstance(metrics["lr"], FakeTensor)


def test_step_metrics_false_leaves_the_loss_fns_metrics_and_a_loss_fn_metric_wins():
    net, batch = linear_problem()
    state = ftrain.TrainState.create(net, optim.sgd(0.1))
    _, metrics = ftrain.make_train_step(linear_loss_fn, compile=False, step_metrics=False)(state, batch)
    assert sorted(metrics) == ["loss"]

    def with_own_lr(apply, params, buffers, batch, key):
        return linear_loss_fn(apply, params, buffers, batch, key), {"lr": torch.tensor(7.0)}

    _, metrics = ftrain.make_train_step(with_own_lr, compile=False)(state, batch)
    assert float(metrics["lr"]) == 7.0 and "grad_norm" in metrics


def test_an_optimizer_without_a_learning_rate_reports_only_grad_norm():
    net, batch = linear_problem()
    state = ftrain.TrainState.create(net, optim.chain(optim.scale(-0.1)))
    _, metrics = ftrain.make_train_step(linear_loss_fn, compile=False)(state, batch)
    assert sorted(metrics) == ["grad_norm", "loss"]


def test_compiled_step_computes_them_in_its_one_graph(mlp_setup):
    """The shared compiled MLP step (AdamW, warmup-cosine): same numbers as eager, no recompile."""
    eager = ftrain.make_train_step(mlp_setup.loss_fn, compile=False)
    schedule = schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=3, decay_steps=50)
    state = make_mlp_state(0)
    compiles = None
    for i, batch in enumerate(mlp_batches(3)):
        expected_state, expected = eager(state, batch)
        state, metrics = mlp_setup.train_step(state, batch)
        compiles = compiles or mlp_setup.train_step.num_compiles  # (other tests may have compiled it already)
        for name in ("grad_norm", "lr"):
            assert float(metrics[name]) == pytest.approx(float(expected[name]), rel=1e-5)
        assert float(metrics["lr"]) == pytest.approx(float(schedule(torch.tensor(i))), rel=1e-6, abs=1e-12)
    assert float(metrics["grad_norm"]) > 0
    assert mlp_setup.train_step.num_compiles == compiles  # the metrics change nothing from step to step


def test_fit_logs_train_grad_norm_and_train_lr(tmp_path):
    net, batch = linear_problem()
    state = ftrain.TrainState.create(net, optim.adam(0.05))
    sink = ftrain.writers.JSONL(tmp_path / "m.jsonl")
    step = ftrain.make_train_step(linear_loss_fn, compile=False)
    ftrain.fit(state, step, [batch] * 4, num_steps=4, log=sink, log_every=2, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/grad_norm" in r]
    assert len(logged) == 2 and all(r["train/lr"] == pytest.approx(0.05) for r in logged)
