"""Periodic actions, driven by step (and time passed in) with plain Python fake steps: no compile, no sleep."""

import dataclasses
import io
import json
import math

import pytest
import torch
from torch import nn

import ftrain
from ftrain import actions
from ftrain.actions import Checkpoint, Every, Run


def tiny_state():
    torch.manual_seed(0)
    return ftrain.TrainState.create(nn.Linear(2, 1), ftrain.optim.sgd(0.1))


def step_with_losses(losses):
    """A fake train step: step i (1-based) has loss losses[i-1]; the params move by that loss."""

    def step(state, batch):
        loss = torch.tensor(losses[int(state.step)])
        params = {k: v + loss for k, v in state.params.items()}
        return state.replace(step=state.step + 1, params=params), {"loss": loss}

    return step


DATA = [torch.zeros(2)] * 5


class FakeManager:
    """A Checkpointer that records what it was asked to save."""

    copies_state = False

    def __init__(self, every=1):
        self.every, self.saved, self.waits, self.forced = every, [], 0, []

    def should_save(self, step):
        return step % self.every == 0

    def save(self, state, *, data=None, metrics=None, force=False):
        self.saved.append((int(state.step), ftrain.tree.map(torch.clone, state.params), data, dict(metrics or {})))
        if force:
            self.forced.append(int(state.step))

    def wait(self):
        self.waits += 1

    def restore_latest(self, template):
        return None

    def close(self):
        pass


# ---- triggers ----


def test_every_steps_epochs_seconds():
    assert [s for s in range(1, 13) if Every(4).should_run(s)] == [4, 8, 12]
    third = Every(epochs=1 / 3)
    assert [s for s in range(1, 21) if third.should_run(s, steps_per_epoch=10)] == [4, 7, 10, 14, 17, 20]
    two = Every(epochs=2)
    assert [s for s in range(1, 31) if two.should_run(s, steps_per_epoch=7)] == [14, 28]
    # The seconds clock lives in the action using the trigger: the first call starts it.
    clock = Every(seconds=10)
    assert fired_steps(clock, enumerate([0.0, 3.0, 9.9, 10.0, 12.0, 19.9, 20.0, 45.0])) == [3, 6, 7]
    assert fired_steps(Every(5, seconds=100), [(s, float(s)) for s in range(1, 11)]) == [5, 10]
    assert (clock.should_run(3, time=9.9, since=0.0), clock.should_run(3, time=10.0, since=0.0)) == (False, True)
    assert not clock.should_run(3, time=1e9), "a clock that has not started does not fire"


def fired_steps(trigger, steps_and_times):
    """The steps at which a periodic action on ``trigger`` fires, given (step, time) pairs."""
    fired = []
    action = actions.Periodic(lambda run: fired.append(run.step), trigger)
    run = Run(state=None)
    action.start(run)
    for step, t in steps_and_times:
        run.step, run.time = step, t
        action(run)
    return fired


def test_every_is_an_immutable_value():
    trigger = Every(5, seconds=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trigger.steps = 3
    assert trigger == actions.every(5, seconds=10) and len({trigger, Every(5, seconds=10)}) == 1
    assert Every.of(5, "log_every") == Every(5) and Every.of(0.5, "eval_every") == Every(epochs=0.5)
    assert Every.of(trigger, "log_every") is trigger
    with pytest.raises(TypeError, match=r"log_every must be an int \(steps\), a float \(epochs\).*got True"):
        Every.of(True, "log_every")


def test_every_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        Every()
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        Every(0)
    with pytest.raises(ValueError, match="epochs must be a positive number, got -1"):
        Every(epochs=-1)
    with pytest.raises(ValueError, match="data has no len"):
        Every(epochs=1).should_run(3)
    with pytest.raises(ValueError, match="needs the time"):
        Every(seconds=1).should_run(3)


def test_every_decorates_a_function_into_an_action_used_by_fit():
    seen = []

    @actions.every(3)
    def record(run):
        seen.append((run.step, int(run.state.step)))

    ftrain.fit(tiny_state(), step_with_losses([1.0] * 10), DATA, num_steps=10, actions=[record], progress=False)
    assert seen == [(3, 3), (6, 6), (9, 9)]


def test_actions_run_in_order_and_a_plain_function_is_an_action():
    calls = []

    class Named:
        def __init__(self, name, order=0):
            self.name, self.order = name, order

        def __call__(self, run):
            calls.append(self.name)

    def plain(run):
        calls.append("plain")

    acts = [Named("late", 200), plain, Named("early", -50)]
    ftrain.fit(tiny_state(), step_with_losses([1.0]), DATA, num_steps=1, actions=acts, progress=False)
    assert calls == ["early", "plain", "late"]


def test_an_action_that_does_not_subclass_action_keeps_the_members_it_declares():
    calls = []

    class Duck:  # duck-typed: what fit accepted before the Action base class, and still does
        order = -200
        publishes = ("duck",)
        keeps_old_states = True
        start = 10  # an attribute that shares a hook's name is not a hook

        def __call__(self, run):
            calls.append(("step", run.step))

        def end(self, run):
            calls.append(("end", run.step))

    wrapped = actions.as_action(Duck())
    assert (wrapped.order, wrapped.publishes, wrapped.keeps_old_states) == (-200, ("duck",), True)
    plain = actions.as_action(len)
    assert (plain.order, plain.publishes, plain.keeps_old_states) == (0, (), False)
    stop = actions.StopOnNonFinite()
    assert actions.as_action(stop) is stop

    class Step:
        def __call__(self, state, batch):
            return step_with_losses([1.0] * 2)(state, batch)

        def donate(self, state, batch):
            raise AssertionError("keeps_old_states=True must switch fit to the pure step")

    ftrain.fit(tiny_state(), Step(), DATA, num_steps=2, actions=[Duck()], progress=False)
    assert calls == [("step", 1), ("step", 2), ("end", 2)]


def test_a_failing_abort_is_reported_and_the_loops_error_propagates():
    class Clumsy(actions.Action):
        def abort(self, run):
            raise RuntimeError("abort broke too")

    def step(state, batch):
        raise OSError("the step failed")

    with pytest.warns(UserWarning, match=r"Clumsy.*\.abort failed while unwinding: RuntimeError\('abort broke too'\)"):
        with pytest.raises(OSError, match="the step failed"):
            ftrain.fit(tiny_state(), step, DATA, num_steps=2, actions=[Clumsy()], progress=False)


# ---- early stopping ----


def scripted_eval(values):
    it = iter(values)

    def eval_step(state, batch):
        return {"loss": torch.tensor(next(it)), "acc": torch.tensor(0.5)}

    return eval_step


@pytest.mark.parametrize(
    "mode,values,min_delta,patience,stops_at",
    [
        ("min", [1.0, 0.8, 0.9, 0.95, 0.7, 0.6], 0.0, 1, 8),  # two evals without improvement after 0.8
        ("min", [1.0, 0.99, 0.98, 0.97, 0.5, 0.4], 0.05, 2, 8),  # 0.01 steps are below min_delta
        ("max", [0.1, 0.5, 0.4, 0.6, 0.55, 0.5], 0.0, 1, 12),
        ("min", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 0.0, 0, None),  # always improving: runs to the end
    ],
)
def test_early_stopping_in_fit(mode, values, min_delta, patience, stops_at):
    stop = actions.EarlyStopping("val/loss", patience=patience, min_delta=min_delta, mode=mode)
    # one eval batch per evaluation, every 2 steps: evaluation k happens after step 2k
    state = ftrain.fit(
        tiny_state(),
        step_with_losses([1.0] * 14),
        DATA,
        num_steps=14,
        eval_step=scripted_eval(values + [9.0] * 3),
        eval_data=[torch.zeros(1)],
        eval_every=2,
        actions=[stop],
        progress=False,
    )
    assert int(state.step) == (stops_at or 14)


def test_early_stopping_monitoring_a_metric_that_is_never_produced():
    kwargs = dict(num_steps=6, eval_data=[torch.zeros(1)], eval_every=2, progress=False)
    with pytest.raises(
        KeyError, match=r"'val/los', which was never produced; available metrics: .*'val/acc', 'val/loss'"
    ):
        ftrain.fit(
            tiny_state(),
            step_with_losses([1.0] * 6),
            DATA,
            eval_step=scripted_eval([1.0] * 6),
            actions=[actions.EarlyStopping("val/los")],
            **kwargs,
        )
    with pytest.raises(ValueError, match=r"no action of this run publishes metrics under 'valid/'.*\['train', 'val'\]"):
        ftrain.fit(
            tiny_state(),
            step_with_losses([1.0] * 6),
            DATA,
            eval_step=scripted_eval([1.0] * 6),
            actions=[actions.EarlyStopping("valid/loss")],
            **kwargs,
        )
    with pytest.raises(ValueError, match="needs eval_step= and eval_data="):
        ftrain.fit(tiny_state(), step_with_losses([1.0]), DATA, actions=[actions.EarlyStopping("val/loss")])
    with pytest.raises(ValueError, match="'group/name'"):
        actions.EarlyStopping("loss")


def test_early_stopping_on_a_custom_published_group():
    class Probe:
        publishes = ("probe",)

        def __call__(self, run):
            run.publish("probe", {"score": float(run.step)})  # gets worse every step in mode="min"

    state = ftrain.fit(
        tiny_state(),
        step_with_losses([1.0] * 20),
        DATA,
        num_steps=20,
        actions=[Probe(), actions.EarlyStopping("probe/score", patience=2)],
        progress=False,
    )
    assert int(state.step) == 4


# ---- non-finite loss ----


NAN = float("nan")


@pytest.mark.parametrize(
    "every,bad_step,expect_step",
    [(1, 7, 6), (3, 7, 6), (3, 5, 3), (4, 10, 8)],
)
def test_stop_on_non_finite_rolls_back_to_the_last_good_state(every, bad_step, expect_step):
    losses = [0.5] * 12
    losses[bad_step - 1] = NAN  # and the params become NaN from that step on
    manager = FakeManager(every=1)

    class Step:
        donated = 0

        def __call__(self, state, batch):
            return step_with_losses(losses)(state, batch)

        def donate(self, state, batch):  # must not be used: the guard keeps references to old states
            Step.donated += 1
            raise AssertionError("donate used")

    state = ftrain.fit(
        tiny_state(),
        Step(),
        DATA,
        num_steps=10,
        checkpoint=manager,
        actions=[actions.StopOnNonFinite(every=every)],
        progress=False,
    )
    assert Step.donated == 0
    assert int(state.step) == expect_step
    start = tiny_state().params
    for k in start:  # the params moved by 0.5 per good step
        torch.testing.assert_close(state.params[k], start[k] + 0.5 * expect_step)
    if every == 1:  # checked every step: no non-finite state was ever handed to the checkpoint manager
        assert [s for s, *_ in manager.saved] == list(range(1, expect_step + 1))
        for _, params, _, _ in manager.saved:
            assert all(torch.isfinite(p).all() for p in params.values())


def test_stop_on_non_finite_names_a_missing_metric():
    def step(state, batch):
        return state.replace(step=state.step + 1), {"xent": torch.tensor(1.0)}

    with pytest.raises(KeyError, match=r"checks 'loss', which the step does not return; its metrics are \['xent'\]"):
        ftrain.fit(tiny_state(), step, DATA, num_steps=2, actions=[actions.StopOnNonFinite()], progress=False)


# ---- checkpoint action ----


def test_checkpoint_saves_on_schedule_at_the_end_and_copies_a_donated_state():
    manager = FakeManager(every=4)
    seen_states = []

    class DonatingStep:
        def __call__(self, state, batch):
            raise AssertionError("fit should use .donate")

        def donate(self, state, batch):
            new, metrics = step_with_losses([0.25] * 10)(state, batch)
            for old, fresh in zip(ftrain.tree.leaves(state), ftrain.tree.leaves(new)):
                old.copy_(fresh)  # write the new values into the input's storage, like the real .donate
            seen_states.append(state)
            return state, metrics

    class Loader(list):
        pos = 0

        def __iter__(self):
            for i, b in enumerate(list.__iter__(self)):
                Loader.pos = i + 1
                yield b

        def state_dict(self):
            return {"batch": Loader.pos}

    saved_params = []
    real_save = manager.save

    def save(state, **kw):
        saved_params.append([x.untyped_storage().data_ptr() for x in state.params.values()])
        real_save(state, **kw)

    manager.save = save
    ftrain.fit(tiny_state(), DonatingStep(), Loader(DATA), num_steps=10, checkpoint=manager, progress=False)
    assert [s for s, *_ in manager.saved] == [4, 8, 10] and manager.forced == [10]
    assert [d for _, _, d, _ in manager.saved] == [{"batch": 4}, {"batch": 3}, {"batch": 5}]
    assert manager.waits == 1
    live = {x.untyped_storage().data_ptr() for x in seen_states[-1].params.values()}
    assert all(not (set(ptrs) & live) for ptrs in saved_params), "a donated state was handed to save() uncopied"
    assert torch.equal(manager.saved[0][1]["bias"], tiny_state().params["bias"] + 1.0)


def test_checkpoint_skips_its_copy_when_the_manager_stages_its_own():
    class StagingManager(FakeManager):
        copies_state = True

    manager = StagingManager(every=2)
    handed = []
    real_save = manager.save

    def save(state, **kw):
        handed.append(state)
        real_save(state, **kw)

    manager.save = save
    run = Run(state=tiny_state(), step=2, donating=True)
    Checkpoint(manager)(run)
    assert handed[0] is run.state, "the action copied a state the manager stages itself"
    plain = FakeManager(every=2)
    plain_handed = []
    plain.save = lambda state, **kw: plain_handed.append(state)
    Checkpoint(plain)(run)
    assert plain_handed[0] is not run.state


def test_checkpoint_sees_this_steps_evaluation():
    manager = FakeManager(every=3)
    ftrain.fit(
        tiny_state(),
        step_with_losses([1.0] * 6),
        DATA,
        num_steps=6,
        eval_step=scripted_eval([3.0, 2.0, 1.0]),
        eval_data=[torch.zeros(1)],
        eval_every=3,
        checkpoint=manager,
        progress=False,
    )
    assert [(s, m["val/loss"]) for s, _, _, m in manager.saved] == [(3, 3.0), (6, 2.0)]


def test_checkpoint_rejects_a_non_manager():
    with pytest.raises(TypeError, match=r"lacks \['should_save', 'save', 'wait'\]"):
        ftrain.fit(tiny_state(), step_with_losses([1.0]), DATA, checkpoint="runs/x")


def test_checkpoint_names_what_a_manager_lacks_of_the_checkpointer_protocol():
    class SaveOnly:
        def should_save(self, step):
            return True

        def save(self, state, **kw):
            pass

        def wait(self):
            pass

    with pytest.raises(TypeError, match=r"a SaveOnly lacks \['restore_latest', 'close', 'copies_state'\]"):
        Checkpoint(SaveOnly())
    assert isinstance(FakeManager(), ftrain.checkpoint.Checkpointer)


# ---- progress bar, profiler, logging ----


def test_progress_bar_shows_rate_eta_and_metrics_and_refreshes_only_at_its_interval():
    out = io.StringIO()
    bar = actions.ProgressBar(every=5, file=out, mininterval=0)
    refreshes = []
    original = bar._refresh
    bar._refresh = lambda run: (refreshes.append(run.step), original(run))
    ftrain.fit(
        tiny_state(), step_with_losses([0.5] * 20), DATA, num_steps=20, log_every=5, progress=False, actions=[bar]
    )
    text = out.getvalue()
    assert "20/20" in text and "step/s" in text and "loss=0.5" in text
    assert refreshes == [5, 10, 15, 20, 20]  # every 5 steps, plus the final refresh at the end


def test_profile_writes_a_chrome_trace_of_the_window(tmp_path):
    prof = actions.Profile(tmp_path, start=2, steps=3)
    ftrain.fit(tiny_state(), step_with_losses([0.5] * 8), DATA, num_steps=8, actions=[prof], progress=False)
    assert [p.rsplit("/", 1)[1] for p in prof.traces] == ["trace_3_5.json"]
    with open(prof.traces[0]) as f:
        trace = json.load(f)
    assert trace["traceEvents"], "empty trace"


def test_log_metrics_publishes_train_means_and_throughput():
    run = Run(state=None, step=0)
    run.time = 0.0
    log = actions.LogMetrics(every=3)
    log.start(run)
    for s in range(1, 7):
        run.step, run.time = s, float(s)  # one step per second
        run.train_metrics.update({"loss": torch.tensor(float(s))})
        log(run)
    assert run.latest == {"train/loss": 5.0, "train/steps_per_sec": 1.0}


def test_periodic_and_run_stop_keeps_the_first_reason():
    run = Run(state=None, step=4)
    actions.Periodic(lambda r: r.stop("first"), every=2)(run)
    run.stop("second")
    assert run.stop_reason == "first" and not run.rolled_back
    assert math.isfinite(run.time)


def test_a_trigger_shared_by_two_actions_fires_for_each_of_them():
    # fit hands its log_every trigger to both LogMetrics and the ProgressBar: each action keeps its own clock.
    trigger = actions.every(seconds=10)
    log = actions.LogMetrics(trigger)
    bar = actions.ProgressBar(trigger, file=io.StringIO(), mininterval=0)
    refreshed, logged = [], []
    original = bar._refresh
    bar._refresh = lambda run: (refreshed.append(run.step), original(run))
    run = Run(state=None, step=0, num_steps=8)
    log.start(run)
    bar.start(run)
    for step, t in enumerate([1.0, 5.0, 11.0, 12.0, 22.0, 30.0, 33.0], start=1):
        run.step, run.time, run.new = step, t, {}
        run.train_metrics.update({"loss": torch.tensor(1.0)})
        log(run)
        bar(run)
        if run.new:
            logged.append(step)
    bar.end(run)
    assert logged == [3, 5, 7]  # the first call starts the clock; then every 10 s
    assert refreshed == [3, 5, 7, 7]  # the same steps, plus the final refresh at the end
