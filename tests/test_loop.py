"""fit / evaluate / predict: fast tests over plain Python fake steps, then end to end with compiled steps.

The compiled functions here: the digits MLP's train step (pure) and eval step, built once per module,
plus the shared ``mlp_setup`` step's ``.donate`` (tests/step_fixtures.py).
"""

import inspect
import time

import pytest
import torch
from cache_worker import cold_cache  # noqa: F401  (a fixture)
from test_metrics import SyncCounter
from torch import nn

import ftrain
from ftrain import actions, optim
from ftrain.data import Loader


def tiny_state(seed=0):
    torch.manual_seed(seed)
    return ftrain.TrainState.create(nn.Linear(2, 1), optim.sgd(0.1))


def batch_step(state, batch):
    """A deterministic fake step: the params move by the batch mean; the loss is the batch mean."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    m = x.float().mean()
    params = {k: v + m for k, v in state.params.items()}
    return state.replace(step=state.step + 1, params=params), {"loss": m}


def const_batches(n):
    return [torch.full((4, 2), float(i)) for i in range(n)]


# ---- the signature is frozen ----


def test_fit_signature_is_frozen():
    params = inspect.signature(ftrain.fit).parameters
    assert [(p.name, p.kind.name, p.default) for p in params.values()] == [
        ("state", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("train_step", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("data", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("num_steps", "KEYWORD_ONLY", None),
        ("num_epochs", "KEYWORD_ONLY", None),
        ("eval_step", "KEYWORD_ONLY", None),
        ("eval_data", "KEYWORD_ONLY", None),
        ("eval_every", "KEYWORD_ONLY", None),
        ("checkpoint", "KEYWORD_ONLY", None),
        ("resume", "KEYWORD_ONLY", True),
        ("log", "KEYWORD_ONLY", None),
        ("log_every", "KEYWORD_ONLY", 50),
        ("hparams", "KEYWORD_ONLY", None),
        ("progress", "KEYWORD_ONLY", True),
        ("actions", "KEYWORD_ONLY", ()),
    ], "fit's signature is frozen: add a feature as an action or a data wrapper, not a flag"


# ---- iteration ----


def test_num_steps_spans_epochs_and_equals_a_plain_loop():
    data = const_batches(3)
    out = ftrain.fit(tiny_state(), batch_step, data, num_steps=7, progress=False)
    ref = tiny_state()
    for b in (data * 3)[:7]:
        ref, _ = batch_step(ref, b)
    assert int(out.step) == 7 and ftrain.tree.equal(out.params, ref.params)


def test_num_epochs_with_and_without_len_and_the_default_of_one_epoch():
    data = const_batches(4)
    assert int(ftrain.fit(tiny_state(), batch_step, data, num_epochs=3, progress=False).step) == 12
    assert int(ftrain.fit(tiny_state(), batch_step, data, progress=False).step) == 4

    class NoLen:
        passes = 0

        def __iter__(self):
            NoLen.passes += 1
            return iter(data)

    assert int(ftrain.fit(tiny_state(), batch_step, NoLen(), num_epochs=2, progress=False).step) == 8
    assert NoLen.passes == 2
    gen = (b for b in data)
    assert int(ftrain.fit(tiny_state(), batch_step, gen, progress=False).step) == 4


def test_a_dataloader_works_and_batches_keep_their_structure():
    ds = torch.utils.data.TensorDataset(torch.arange(12.0).reshape(6, 2), torch.arange(6))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    seen = []

    def step(state, batch):
        x, y = batch
        seen.append(y.tolist())
        return state.replace(step=state.step + 1), {"loss": x.sum()}

    ftrain.fit(tiny_state(), step, loader, num_epochs=1, progress=False)
    assert seen == [[0, 1], [2, 3], [4, 5]]


def test_num_steps_is_absolute_so_a_finished_run_does_nothing():
    state = ftrain.fit(tiny_state(), batch_step, const_batches(3), num_steps=5, progress=False)
    calls = []
    again = ftrain.fit(state, lambda s, b: calls.append(1), const_batches(3), num_steps=5, progress=False)
    assert again is state and calls == []


def test_the_hot_loop_syncs_only_at_the_log_and_eval_intervals():
    def step(state, batch):
        loss = batch.mean().as_subclass(SyncCounter)
        return state.replace(step=state.step + 1), {"loss": loss, "acc": (loss * 0 + 1).as_subclass(SyncCounter)}

    def eval_step(state, batch):
        return {"loss": batch.mean().as_subclass(SyncCounter)}

    SyncCounter.syncs = 0
    ftrain.fit(
        tiny_state(),
        step,
        const_batches(10),
        num_steps=100,
        log_every=25,
        eval_step=eval_step,
        eval_data=const_batches(3),
        eval_every=50,
        progress=True,
        actions=[actions.EarlyStopping("val/loss", patience=10)],
    )
    # one stacked transfer per log (4) and per evaluation (2); nothing per step
    assert SyncCounter.syncs == 4 + 2


def test_fit_uses_donate_and_the_loop_overhead_is_small():
    class Step:
        pure = donated = 0

        def __call__(self, state, batch):
            Step.pure += 1
            return batch_step(state, batch)

        def donate(self, state, batch):
            Step.donated += 1
            return batch_step(state, batch)

    ftrain.fit(tiny_state(), Step(), const_batches(5), num_steps=10, progress=False)
    assert (Step.pure, Step.donated) == (0, 10)
    ftrain.fit(
        tiny_state(), Step(), const_batches(5), num_steps=10, progress=False, actions=[actions.StopOnNonFinite()]
    )
    assert (Step.pure, Step.donated) == (10, 10)


def test_fit_with_the_compiled_donating_step_matches_a_manual_loop(mlp_setup):
    batches = mlp_setup.batches(6)
    ref = mlp_setup.make_state()
    for b in batches * 2:
        ref, _ = mlp_setup.train_step.donate(ref, b)
    state = mlp_setup.make_state()
    compiles = mlp_setup.train_step.num_compiles
    out = ftrain.fit(state, mlp_setup.train_step, batches, num_epochs=2, progress=False)
    assert ftrain.tree.equal(out.params, ref.params)
    assert mlp_setup.train_step.num_compiles == compiles
    with pytest.raises(ftrain.DonatedStateError):
        int(state.step)  # the state passed in was consumed, loudly


# ---- resume and checkpoints ----


class FakeManager:
    """A Checkpointer that restores ``restored`` and records what it was asked to save."""

    copies_state = False

    def __init__(self, restored=None, every=3):
        self.restored, self.every = restored, every
        self.saved, self.waits, self.restores = [], 0, 0

    def restore_latest(self, template):
        self.restores += 1
        return self.restored

    def should_save(self, step):
        return step % self.every == 0

    def save(self, state, *, data=None, metrics=None, force=False):
        self.saved.append((int(state.step), data, force))

    def wait(self):
        self.waits += 1

    def close(self):
        pass


class PositionedData(list):
    def __init__(self, items):
        super().__init__(items)
        self.start = self.pos = 0
        self.loaded = None

    def __iter__(self):
        items, self.start = list.__iter__(self), 0
        for i, b in enumerate(items):
            if i < self.pos:
                continue
            self.pos = i + 1
            yield b
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.loaded = d
        self.pos = d["pos"]


def test_fit_resumes_from_the_manager_and_restores_the_data_position():
    at4 = ftrain.fit(tiny_state(), batch_step, const_batches(5), num_steps=4, progress=False)
    manager = FakeManager(restored=(at4, {"data": {"pos": 4}}))
    data = PositionedData(const_batches(5))
    out = ftrain.fit(tiny_state(), batch_step, data, num_steps=8, checkpoint=manager, progress=False)
    ref = ftrain.fit(tiny_state(), batch_step, const_batches(5), num_steps=8, progress=False)
    assert data.loaded == {"pos": 4}
    assert int(out.step) == 8 and ftrain.tree.equal(out.params, ref.params)
    assert manager.saved == [(6, {"pos": 1}, False), (8, {"pos": 3}, True)] and manager.waits == 1

    fresh = FakeManager(restored=(at4, {"data": {"pos": 4}}))
    out = ftrain.fit(tiny_state(), batch_step, const_batches(5), num_steps=2, checkpoint=fresh, resume=False)
    assert fresh.restores == 0 and int(out.step) == 2


def test_exact_resume_with_the_real_manager_and_loader(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.randn(40, 2, generator=torch.Generator().manual_seed(0)))
    seen_a, seen_b = [], []

    def recording(seen):
        def step(state, batch):
            seen.append(batch[0].sum().item())
            return batch_step(state, batch)

        return step

    full = ftrain.fit(tiny_state(), recording(seen_a), Loader(ds, 8, seed=3), num_steps=13, progress=False)

    with ftrain.CheckpointManager(tmp_path, save_every=3, async_save=True) as manager:
        ftrain.fit(
            tiny_state(), recording(seen_b), Loader(ds, 8, seed=3), num_steps=7, checkpoint=manager, progress=False
        )
        assert manager.all_steps() == [3, 6, 7]
    with ftrain.CheckpointManager(tmp_path, save_every=3) as manager:  # "the same command, run again"
        resumed = ftrain.fit(
            tiny_state(), recording(seen_b), Loader(ds, 8, seed=3), num_steps=13, checkpoint=manager, progress=False
        )
        assert manager.latest_step() == 13
    assert seen_a == seen_b
    assert torch.equal(full.step, resumed.step) and ftrain.tree.equal(full.params, resumed.params)


def test_data_failing_mid_epoch_propagates_with_context_and_keeps_the_checkpoints(tmp_path):
    def flaky():
        for i, b in enumerate(const_batches(10)):
            if i == 5:
                raise OSError("the network drive went away")
            yield b

    with ftrain.CheckpointManager(tmp_path, save_every=2) as manager:
        with pytest.raises(OSError, match="network drive") as info:
            ftrain.fit(tiny_state(), batch_step, flaky(), num_steps=10, checkpoint=manager, progress=False)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "while producing the batch for step 6" in notes
        assert manager.all_steps() == [2, 4]  # complete, and nothing saved after the failure
        state, extras = manager.restore_latest(tiny_state())
    ref = ftrain.fit(tiny_state(), batch_step, const_batches(10), num_steps=4, progress=False)
    assert int(state.step) == 4 and ftrain.tree.equal(state.params, ref.params)


def test_a_step_failing_gets_the_step_in_the_error():
    def step(state, batch):
        if int(state.step) == 2:
            raise RuntimeError("shape mismatch")
        return batch_step(state, batch)

    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        ftrain.fit(tiny_state(), step, const_batches(5), num_steps=5, progress=False)
    assert "train_step raised at step 3" in "\n".join(info.value.__notes__)


# ---- bad input ----


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_steps=0), ValueError, "num_steps must be a positive int, got 0"),
        (dict(num_steps=-3), ValueError, "num_steps must be a positive int, got -3"),
        (dict(num_steps=2.5), ValueError, "num_steps must be a positive int, got 2.5"),
        (dict(num_epochs=0), ValueError, "num_epochs must be a positive int"),
        (dict(num_steps=3, num_epochs=1), ValueError, "not both"),
        (dict(eval_step=lambda s, b: {}), ValueError, "eval_step and eval_data go together"),
        (dict(eval_every=5), ValueError, "eval_every needs eval_step"),
        (dict(actions=[42]), TypeError, r"actions\[0\] is a int, not callable"),
        (dict(log="runs/x"), TypeError, "log= expects a writer"),
        (dict(log_every=0), ValueError, "steps must be a positive int"),
    ],
)
def test_bad_arguments_are_refused_before_the_first_step(kwargs, error, match):
    calls = []
    with pytest.raises(error, match=match):
        ftrain.fit(tiny_state(), lambda s, b: calls.append(1), const_batches(2), **kwargs)
    assert calls == []


def test_an_epoch_interval_needs_data_with_a_length():
    gen = (b for b in const_batches(4))
    with pytest.raises(ValueError, match=r"interval in epochs \(Every\(epochs=1/2\)\) needs data with a len\(\)"):
        ftrain.fit(tiny_state(), batch_step, gen, eval_step=lambda s, b: {}, eval_data=[1], eval_every=0.5)


def test_empty_data():
    with pytest.raises(ValueError, match=r"training data is empty \(len\(data\) == 0"):
        ftrain.fit(tiny_state(), batch_step, [], num_steps=3)
    with pytest.raises(ValueError, match="produced no batches"):
        ftrain.fit(tiny_state(), batch_step, (b for b in []), num_steps=3, progress=False)
    with pytest.raises(TypeError, match="must be an iterable of batches.*got Tensor"):
        ftrain.fit(tiny_state(), batch_step, torch.zeros(4, 2), num_steps=3)
    with pytest.raises(ValueError, match="evaluate: the data produced no batches"):
        ftrain.evaluate(tiny_state(), lambda s, b: {}, [])


def test_an_exhausted_iterator_stops_early_with_a_warning():
    with pytest.warns(RuntimeWarning, match="ran out after 3 steps, before num_steps=10"):
        out = ftrain.fit(tiny_state(), batch_step, iter(const_batches(3)), num_steps=10, progress=False)
    assert int(out.step) == 3


def test_metrics_must_be_a_dict():
    with pytest.raises(TypeError, match="metrics a dict of 0-d tensors, got metrics of type Tensor"):
        ftrain.fit(tiny_state(), lambda s, b: (s, b.sum()), const_batches(2), progress=False)


# ---- evaluate / predict / debugging helpers ----


def test_evaluate_weights_batches_by_size_so_a_short_last_batch_is_exact():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    batches = [x[:4], x[4:8], x[8:]]

    def eval_step(state, batch):
        return {"mean": batch.mean(), "rows": torch.tensor(batch.shape[0])}

    out = ftrain.evaluate(tiny_state(), eval_step, batches, reductions={"rows": "sum"})
    assert out["mean"] == pytest.approx(float(x.mean()), rel=1e-6) and out["rows"] == 10


def test_predict_concatenates_tensors_and_trees():
    state = tiny_state()

    def predict_step(state, x):
        out, _ = state.apply_fn(state.params, state.buffers, x)
        return {"y": out, "x2": x * 2}

    xs = [torch.randn(3, 2), torch.randn(2, 2)]
    out = ftrain.predict(state, predict_step, xs)
    ref = state.to_module()(torch.cat(xs))
    torch.testing.assert_close(out["y"], ref.detach())
    assert torch.equal(out["x2"], torch.cat(xs) * 2)
    assert len(ftrain.predict(state, predict_step, xs, concat=False)) == 2


def test_limit_and_overfit_batches():
    data = const_batches(10)
    seen = []

    def step(state, batch):
        seen.append(int(batch[0, 0]))
        return batch_step(state, batch)

    ftrain.fit(tiny_state(), step, ftrain.limit_batches(data, 3), num_epochs=2, progress=False)
    assert seen == [0, 1, 2, 0, 1, 2]
    seen.clear()
    ftrain.fit(tiny_state(), step, ftrain.overfit_batches(iter(data), 2), num_steps=5, progress=False)
    assert seen == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="asked for 20 batches, but the data has only 10"):
        ftrain.overfit_batches(data, 20)


def test_fast_dev_run_runs_train_and_eval_writes_nothing_and_keeps_the_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Step:
        def __call__(self, state, batch):
            return batch_step(state, batch)

        def donate(self, state, batch):
            raise AssertionError("fast_dev_run must not consume the state")

    state = tiny_state()
    evals = []
    out = ftrain.fast_dev_run(
        state,
        Step(),
        const_batches(100),
        eval_step=lambda s, b: evals.append(1) or {"loss": b.mean()},
        eval_data=const_batches(100),
        steps=3,
    )
    assert sorted(out) == ["train/loss", "train/steps_per_sec", "val/loss"]
    assert out["train/loss"] == pytest.approx(1.0) and out["val/loss"] == pytest.approx(1.0)
    assert len(evals) == 3 and int(state.step) == 0 and list(tmp_path.iterdir()) == []


# ---- end to end: digits, compiled ----


def digits_loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    loss = nn.functional.cross_entropy(logits, y)
    return loss, {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def digits_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    # The learning rate is injected (a tensor in the state): lr_find sets it without recompiling.
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=3e-3, weight_decay=1e-4)
    return ftrain.TrainState.create(net, tx, key=ftrain.random.key(0))


@pytest.fixture(scope="module")
def digits_steps():
    return ftrain.make_train_step(digits_loss_fn), ftrain.make_eval_step(digits_loss_fn)


@pytest.mark.usefixtures("cold_cache")  # it counts compiles
def test_digits_mlp_reaches_95_percent_validation_accuracy(digits_steps, tmp_path):
    train_step, eval_step = digits_steps
    train = Loader(ftrain.datasets.digits("train"), 32, seed=0)
    val = [ftrain.datasets.digits("val").tensors]  # one batch of 269: one eval graph, no partial-batch recompile
    sink = ftrain.writers.JSONL(tmp_path / "metrics.jsonl")
    t0 = time.perf_counter()
    state = ftrain.fit(
        digits_state(),
        train_step,
        train,
        num_epochs=4,
        eval_step=eval_step,
        eval_data=val,
        eval_every=2.0,  # every 2 epochs
        log=sink,
        hparams={"lr": 3e-3, "batch_size": 32},
        progress=False,
        actions=[actions.StopOnNonFinite(every=39), actions.EarlyStopping("val/acc", mode="max", patience=3)],
    )
    elapsed = time.perf_counter() - t0
    result = ftrain.evaluate(state, eval_step, val)
    assert result["acc"] >= 0.95, result
    assert train_step.num_compiles == 1 and eval_step.num_compiles == 1
    assert elapsed < 120, f"fit took {elapsed:.0f} s (compiles included)"
    # the val metrics were published every 2 epochs (39 steps/epoch) and written
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"hparams": {"lr": 3e-3, "batch_size": 32}}
    assert [r["step"] for r in rows if "val/acc" in r][:2] == [78, 156]


def test_lr_find_sweeps_from_the_same_state_without_recompiling(digits_steps):
    train_step, _ = digits_steps
    data = Loader(ftrain.datasets.digits("train"), 32, seed=1)
    state = digits_state()
    before = ftrain.tree.map(torch.clone, state.params)
    train_step(state, next(iter(data)))  # make sure the step is compiled before counting
    compiles = train_step.num_compiles
    result = ftrain.lr_find(state, train_step, data, min_lr=1e-5, max_lr=10.0, num_steps=60)
    assert train_step.num_compiles == compiles, "the sweep recompiled"
    assert ftrain.tree.equal(state.params, before) and int(state.step) == 0  # nothing to restore
    assert result.lrs[0] == pytest.approx(1e-5) and len(result.lrs) == len(result.losses) <= 60
    assert 1e-4 < result.suggestion < 1.0
    # the loss fell somewhere in the sweep and it stopped once diverging (or reached max_lr)
    assert min(result.losses) < result.losses[0]


def test_lr_find_refuses_an_optimizer_without_an_injected_learning_rate():
    with pytest.raises(ValueError, match="inject_hyperparams"):
        ftrain.lr_find(tiny_state(), batch_step, const_batches(2))


def test_find_batch_size_bisects_to_the_largest_that_fits():
    tried = []

    def step(state, batch):
        tried.append(batch.shape[0])
        if batch.shape[0] > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch_step(state, batch)

    state = tiny_state()
    size = ftrain.find_batch_size(state, step, lambda n: torch.zeros(n, 2), start=16, max_size=4096)
    assert size == 300 and int(state.step) == 0
    assert tried[:10] == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]

    def broken(state, batch):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        ftrain.find_batch_size(state, broken, lambda n: torch.zeros(n, 2))
