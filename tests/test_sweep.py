"""ftrain.sweep: members stay independent, a sweep resumes exactly, masks need no recompile, bad input is named."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules, sweep

N_FEATURES, N_CLASSES = 6, 3


def make_model(init_scale: float = 1.0) -> nn.Module:
    model = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, N_CLASSES))
    with torch.no_grad():
        model[0].weight.mul_(init_scale)
    return model


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def dataset(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, N_FEATURES, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


TX = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.0)
SETTINGS = sweep.grid(learning_rate=[1e-3, 1e-2], weight_decay=[0.0, 0.1]) + [
    {"learning_rate": 3e-2, "weight_decay": 0.0, "seed": 7, "init_scale": 0.5}
]


def member_settings(setting):
    return {**{"seed": 0, "init_scale": 1.0}, **setting}


def test_each_member_trains_as_its_own_run_would():
    settings = [member_settings(s) for s in SETTINGS]
    state = sweep.create(make_model, TX, settings)
    step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False), compile=False)
    state = ftrain.fit(state, step, ftrain.data.Loader(dataset(), 16, seed=1), num_steps=8, progress=False)
    assert int(state.step) == 8 and state.active.all()
    for i, setting in enumerate(settings):
        torch.manual_seed(setting["seed"])
        tx = optim.adamw(setting["learning_rate"], weight_decay=setting["weight_decay"])
        alone = ftrain.TrainState.create(make_model(setting["init_scale"]), tx, key=ftrain.random.key(setting["seed"]))
        alone = ftrain.fit(
            alone,
            ftrain.make_train_step(loss_fn, compile=False),
            ftrain.data.Loader(dataset(), 16, seed=1),
            num_steps=8,
            progress=False,
        )
        member = state.member(i)
        for name in alone.params:
            torch.testing.assert_close(member.params[name], alone.params[name], msg=f"member {i} {name}")


def test_a_sweep_resumes_exactly_from_its_checkpoint(tmp_path):
    def run(directory, num_steps):
        state = sweep.create(make_model, TX, SETTINGS[:3])
        step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False), compile=False)
        manager = ftrain.CheckpointManager(directory, save_every=3, async_save=False, config={"n": 3})
        with manager:
            return ftrain.fit(
                state,
                step,
                ftrain.data.Loader(dataset(), 16, seed=2),
                num_steps=num_steps,
                checkpoint=manager,
                progress=False,
            )

    whole = run(tmp_path / "whole", 7)
    first = run(tmp_path / "split", 4)  # interrupted after step 4 (saved at 3 and at its end)
    resumed = run(tmp_path / "split", 7)
    assert int(first.step) == 4 and int(resumed.step) == 7
    assert ftrain.tree.equal(resumed.members, whole.members)
    assert torch.equal(resumed.active, whole.active)


def test_a_diverged_member_is_frozen_and_masked_without_recompiling():
    state = sweep.create(make_model, TX, sweep.grid(learning_rate=[1e-2, 1e30, 1e-3]))
    step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False))
    batches = [(x.unsqueeze(0).expand(8, -1), y.expand(8)) for x, y in zip(*dataset(4).tensors)]
    state, metrics = step(state, batches[0])
    for batch in batches[1:]:
        state, metrics = step(state, batch)
    assert state.active.tolist() == [True, False, True]
    assert ftrain.tree.all_finite(state.members.params)
    assert torch.isnan(metrics["loss/1"]) and torch.isfinite(metrics["loss"])
    assert float(metrics["active"]) == 2
    frozen = state.members.step.tolist()
    state = sweep.deactivate(state, [0])
    state, _ = step(state, batches[0])
    assert state.members.step.tolist() == [frozen[0], frozen[1], frozen[2] + 1]
    assert step.num_compiles + step.num_loads == 1  # (compiled here, or served by the step cache)


def test_best_member_comes_back_as_an_ordinary_train_state():
    state = sweep.create(make_model, TX, sweep.grid(learning_rate=[1e-4, 3e-2]))
    step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False), compile=False)
    data = ftrain.data.Loader(dataset(), 16, seed=0)
    state = ftrain.fit(state, step, data, num_epochs=5, progress=False)
    evaluate = sweep.eval_step(ftrain.make_eval_step(loss_fn, compile=False), compile=False)
    metrics = ftrain.evaluate(state, evaluate, ftrain.data.Loader(dataset(), 64, shuffle=False))
    i, member = sweep.best(state, metrics, "loss")
    assert i == 1 and state.setting(i) == {"learning_rate": 3e-2}
    assert isinstance(member, ftrain.TrainState) and member.params["0.weight"].shape == (16, N_FEATURES)
    alone = ftrain.evaluate(
        member, ftrain.make_eval_step(loss_fn, compile=False), ftrain.data.Loader(dataset(), 64, shuffle=False)
    )
    assert alone["loss"] == pytest.approx(metrics["loss/1"], rel=1e-5)
    with pytest.raises(KeyError, match="no per-member metric 'acc/0'.*'loss'"):
        sweep.best(state, {"loss/0": 1.0, "loss/1": 2.0}, "acc")


def test_members_stop_early_on_their_own():
    state = sweep.create(make_model, TX, sweep.grid(learning_rate=[0.0, 1e-2]))
    step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False), compile=False)
    evaluate = sweep.eval_step(ftrain.make_eval_step(loss_fn, compile=False), compile=False)
    stopper = sweep.EarlyStopMembers("val/loss", patience=1)
    state = ftrain.fit(
        state,
        step,
        ftrain.data.Loader(dataset(), 16, seed=0),
        num_steps=12,
        eval_step=evaluate,
        eval_data=ftrain.data.Loader(dataset(), 64, shuffle=False),
        eval_every=4,
        actions=[stopper],
        progress=False,
    )
    assert list(stopper.stopped) == [0]  # learning rate 0 never improves
    assert state.active.tolist() == [False, True]


def test_a_schedule_peak_is_swept_through_an_injected_factory():
    shape = schedules.warmup_cosine_decay(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=10)

    def make_tx(peak: float):
        return optim.sgd(lambda count: peak * shape(count))

    tx = optim.inject_hyperparams(make_tx)(peak=0.1)
    state = sweep.create(make_model, tx, sweep.grid(peak=[0.0, 0.5]))
    step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False), compile=False)
    state = ftrain.fit(state, step, ftrain.data.Loader(dataset(), 16), num_steps=3, progress=False)
    start = sweep.create(make_model, tx, sweep.grid(peak=[0.0]))
    assert ftrain.tree.equal(state.member(0).params, start.member(0).params)  # peak 0: never moves
    assert not ftrain.tree.equal(state.member(1).params, start.member(0).params)


def test_bad_settings_are_named():
    with pytest.raises(
        ValueError, match=r"sets \['momentum'\].*\(b1, b2, eps, learning_rate, weight_decay\).*init_scale"
    ):
        sweep.create(make_model, TX, sweep.grid(momentum=[0.9, 0.99]))
    with pytest.raises(ValueError, match="not built by optim.inject_hyperparams"):
        sweep.create(make_model, optim.adam(1e-3), sweep.grid(learning_rate=[0.1]))
    with pytest.raises(ValueError, match=r"lengths differ: \{'learning_rate': 3, 'seed': 2\}"):
        sweep.zip_settings(learning_rate=[0.1, 0.2, 0.3], seed=[0, 1])
    with pytest.raises(ValueError, match=r"settings\[1\] names \['learning_rate'\] but settings\[0\] names"):
        sweep.create(make_model, TX, [{"learning_rate": 0.1, "seed": 1}, {"learning_rate": 0.2}])
    scheduled = optim.inject_hyperparams(optim.sgd)(learning_rate=schedules.constant(0.1))
    with pytest.raises(ValueError, match="'learning_rate' follows a schedule.*peak"):
        sweep.create(make_model, scheduled, sweep.grid(learning_rate=[0.1, 0.2]))
    with pytest.raises(IndexError, match=r"member index must be an int in \[0, 2\), got 5"):
        sweep.create(make_model, TX, sweep.grid(learning_rate=[0.1, 0.2])).member(5)


def test_a_member_step_that_changes_the_state_structure_is_named():
    def core(state, batch):
        return state.replace(buffers={"extra": torch.zeros(())}), {"loss": torch.zeros(())}

    state = sweep.create(make_model, TX, sweep.grid(learning_rate=[1e-3, 1e-2]))
    step = sweep.train_step(core, compile=False)
    with pytest.raises(ValueError, match=r"the state its train step returned.*unexpected.*buffers\['extra'\]"):
        step(state, next(iter(ftrain.data.Loader(dataset(), 16))))
