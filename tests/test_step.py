"""Compiled pure steps: equal to eager, compiled once, pure, donating, keyed randomness, precision.

Distinct compiled functions here (compile time is the cost): the shared MLP train step (pure and
donating) and eval step from ``mlp_setup``, a vmapped ensemble of it, a dropout+embedding+BatchNorm
step, an fp16 step and a GAN step. Everything else runs eagerly (``compile=False``) or fails before compiling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from cache_worker import cold_cache  # noqa: F401  (a fixture)
from step_fixtures import make_mlp_state, mlp_batches, mlp_loss_fn
from torch import nn

import ftrain
from ftrain import optim, precision, random, tree


def leaves_equal(a: Any, b: Any) -> bool:
    """Bitwise-equal leaves; static fields (a separately built optimizer's closures) are not compared."""
    return tree.equal(tree.leaves(a), tree.leaves(b))


def leaves_close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    return tree.allclose(tree.leaves(a), tree.leaves(b), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# The shared MLP step (compiled once per session).


def test_compiled_step_equals_eager_per_step_and_never_recompiles(mlp_setup):
    train_step = mlp_setup.train_step
    eager_step = ftrain.make_train_step(mlp_loss_fn, compile=False)
    state = make_mlp_state(0)
    batches = mlp_batches(8)
    state, _ = train_step(state, batches[0])
    compiles = train_step.num_compiles
    assert 1 <= compiles <= 2  # the donating form, if another test ran it first, is the second
    for batch in batches[1:]:  # the learning rate changes every step (warmup, then cosine)
        expected, expected_metrics = eager_step(state, batch)
        state, metrics = train_step(state, batch)
        assert tree.allclose(state, expected, rtol=1e-5, atol=1e-6)
        assert tree.allclose(metrics, expected_metrics, rtol=1e-5, atol=1e-6)
        assert set(metrics) == {"loss", "accuracy", "grad_norm", "lr"} and all(m.dim() == 0 for m in metrics.values())
    assert int(state.step) == 8
    assert train_step.num_compiles == compiles, "a step after the first compiled a new graph"


def test_pure_call_leaves_its_input_untouched(mlp_setup):
    state = make_mlp_state(0)
    snapshot = tree.map(torch.clone, state)
    rng = torch.get_rng_state()
    new_state, _ = mlp_setup.train_step(state, mlp_batches(1)[0])
    assert tree.equal(state, snapshot)
    assert not tree.equal(new_state.opt_state, state.opt_state)  # (the warmup's first lr is 0)
    assert torch.equal(torch.get_rng_state(), rng), "the step must not touch the global RNG"
    assert not torch.are_deterministic_algorithms_enabled(), "the global setting must be restored"
    assert all(not p.requires_grad for p in tree.leaves(new_state.params))


def test_donate_gives_the_same_numbers_in_the_input_memory_and_consumes_the_input(mlp_setup):
    train_step, batches = mlp_setup.train_step, mlp_batches(4)
    pure = make_mlp_state(0)
    for batch in batches:
        pure, pure_metrics = train_step(pure, batch)
    donated = make_mlp_state(0)
    first = donated
    pointers = [x.data_ptr() for x in tree.leaves(donated)]
    for batch in batches:
        donated, metrics = train_step.donate(donated, batch)
    assert leaves_equal(donated, pure), "donation must be bitwise equal to the pure step"
    assert tree.equal(metrics, pure_metrics)
    assert [x.data_ptr() for x in tree.leaves(donated)] == pointers, "results must live in the input's memory"
    # A donated state is dead: any use says so instead of computing with overwritten tensors.
    with pytest.raises(ftrain.DonatedStateError, match="donated"):
        train_step(first, batches[0])
    with pytest.raises(ftrain.DonatedStateError, match="donated"):
        train_step.donate(first, batches[0])
    with pytest.raises(ftrain.DonatedStateError):
        first.params["0.weight"]
    with pytest.raises(ftrain.DonatedStateError):
        int(first.step)
    with pytest.raises(ftrain.DonatedStateError):
        torch.add(tree.leaves(first)[0], 1)


def test_donate_hands_over_any_state_class_and_plain_pytrees():
    @dataclasses.dataclass(frozen=True, eq=False)
    class WithEMA(ftrain.TrainState):
        ema: dict = dataclasses.field(default_factory=dict)

    def loss_fn(apply, params, buffers, batch, key):
        return apply(params, buffers, batch)[0].square().mean()

    def ema_step(state, batch):
        state, metrics = make_step.core(state, batch)
        return state.replace(ema=tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema, state.params)), metrics

    make_step = ftrain.make_train_step(loss_fn, compile=False)
    base = ftrain.TrainState.create(nn.Linear(2, 1), optim.sgd(0.1))
    state = WithEMA(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, ema=tree.map(torch.clone, base.params)
    )
    step = ftrain.compile_step(ema_step, compile=False)
    expected, _ = step(state, torch.ones(3, 2))
    new, _ = step.donate(state, torch.ones(3, 2))
    assert type(new) is WithEMA and new.apply_fn is state.apply_fn and leaves_equal(new, expected)
    with pytest.raises(ftrain.DonatedStateError):
        state.ema["weight"]
    # A plain dict state (a step written from scratch) cannot be poisoned: donating it gives the new dict.
    plain = {"w": torch.ones(2), "n": torch.zeros(())}
    dict_step = ftrain.compile_step(lambda s, b: ({"w": s["w"] * b, "n": s["n"] + 1}, {}), compile=False)
    out, _ = dict_step.donate(plain, torch.tensor(3.0))
    assert torch.equal(out["w"], torch.full((2,), 3.0)) and int(out["n"]) == 1


def test_an_eager_donation_updates_params_and_moments_in_place_and_nothing_else():
    def loss_fn(apply, params, buffers, batch, key):
        return apply(params, buffers, batch)[0].square().mean()

    def make():
        torch.manual_seed(0)
        return ftrain.TrainState.create(nn.Linear(4, 2), optim.adamw(0.1), key=ftrain.random.key(0))

    step = ftrain.make_train_step(loss_fn, compile=False)
    state = make()
    batch = torch.ones(3, 4)
    expected, expected_metrics = step(state, batch)
    written = [*state.params.values(), *state.opt_state[0].mu.values(), *state.opt_state[0].nu.values()]
    new, metrics = step.donate(state, batch)
    assert leaves_equal(new, expected) and tree.equal(metrics, expected_metrics)
    # The optimizer wrote into the input's tensors, as torch.optim does (bitwise the pure step's values).
    assert [*new.params.values(), *new.opt_state[0].mu.values(), *new.opt_state[0].nu.values()] == written
    with pytest.raises(ftrain.DonatedStateError):
        state.params["weight"]
    again, _ = step.donate(new, batch)  # the returned state donates on
    assert int(again.step) == 2
    # A step of your own may read its input after the update: its eager donation writes nothing in place.
    user_step = ftrain.compile_step(lambda s, b: step.core(s, b), compile=False)
    mine = make()
    weight = mine.params["weight"].clone()
    given = mine.params["weight"]
    out, _ = user_step.donate(mine, batch)
    assert torch.equal(given, weight) and leaves_equal(out, expected)


def test_updating_in_place_writes_only_the_tensors_it_was_given():
    tx = optim.adamw(0.1)
    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 0.5)}
    pure, pure_state = tx.fused_apply(grads, tx.init(params), params)
    state = tx.init(params)
    with optim.updating_in_place([params["w"]]):  # (the moments are not among them: all out of place)
        new, _ = tx.fused_apply(grads, state, params)
    assert new["w"] is not params["w"] and torch.equal(params["w"], torch.ones(3)) and torch.equal(new["w"], pure["w"])
    given = [params["w"], state[0].mu["w"], state[0].nu["w"]]
    with optim.updating_in_place(given):
        new, new_state = tx.fused_apply(grads, state, params)
    assert new["w"] is params["w"] and new_state[0].mu["w"] is given[1]
    assert torch.equal(new["w"], pure["w"]) and tree.equal(new_state, pure_state)


def test_donate_refuses_a_state_whose_leaves_share_memory(mlp_setup):
    state = make_mlp_state(0)
    ema = state.params  # the same tensors under two fields
    aliased = dataclasses.replace(state, opt_state=(state.opt_state, ema))
    with pytest.raises(ftrain.StepError, match="shares memory"):
        mlp_setup.train_step.donate(aliased, mlp_batches(1)[0])


def test_eval_step_runs_in_eval_mode_and_compiles_once_more_for_any_smaller_batch(mlp_setup):
    eval_step = mlp_setup.eval_step
    state = make_mlp_state(0)
    module = state.to_module().eval()
    x, y = mlp_batches(1, batch_size=40)[0]
    for size in (16, 7, 5, 3):
        metrics = eval_step(state, (x[:size], y[:size]))
        logits = module(x[:size])
        assert torch.allclose(metrics["loss"], nn.functional.cross_entropy(logits, y[:size]), rtol=1e-5, atol=1e-6)
        assert torch.allclose(metrics["accuracy"], (logits.argmax(-1) == y[:size]).float().mean())
    assert eval_step.num_compiles <= 2, "a partial batch must recompile at most once (dynamic batch dim)"
    assert state.apply_fn.module.training, "the eval step must restore train mode"


def test_partial_or_retyped_batch_in_training_is_a_clear_error(mlp_setup):
    train_step = mlp_setup.train_step
    state = make_mlp_state(0)
    x, y = mlp_batches(1)[0]
    train_step(state, (x, y))
    compiles = train_step.num_compiles
    with pytest.raises(ftrain.StepError, match=r"batch\[0\] has batch size 7 .*drop_last"):
        train_step(state, (x[:7], y[:7]))
    with pytest.raises(ftrain.StepError, match=r"batch\[0\] has dtype torch.float64 .*torch.float32"):
        train_step(state, (x.double(), y))
    assert train_step.num_compiles == compiles


@pytest.mark.usefixtures("cold_cache")  # it counts compiles
def test_vmap_over_a_stacked_state_equals_separate_runs(mlp_setup):
    states = [make_mlp_state(seed) for seed in range(3)]
    data = [mlp_batches(3, seed=seed) for seed in range(3)]
    separate = []
    eager_step = ftrain.make_train_step(mlp_loss_fn, compile=False)
    for state, batches in zip(states, data):
        for batch in batches:
            state, _ = eager_step(state, batch)
        separate.append(state)
    ensemble = compiled_ensemble = ftrain.stack_states(states)
    assert ensemble.params["0.weight"].shape == (3, 32, 8)
    vstep = ftrain.vmap_step(mlp_setup.train_step)  # keyed dropout: each member uses its own key
    compiled_vstep = ftrain.compile_step(ftrain.vmap_step(mlp_setup.train_step))  # the ensemble as one graph
    for i in range(3):
        batch = tree.stack([data[m][i] for m in range(3)])
        ensemble, metrics = vstep(ensemble, batch)
        compiled_ensemble, _ = compiled_vstep(compiled_ensemble, batch)
    assert metrics["loss"].shape == (3,)
    assert compiled_vstep.num_compiles == 1
    for member, compiled_member, expected in zip(
        ftrain.unstack_state(ensemble), ftrain.unstack_state(compiled_ensemble), separate
    ):
        assert leaves_close(member, expected)
        assert leaves_close(compiled_member, expected)


# ---------------------------------------------------------------------------------------------
# Keyed randomness, embeddings and BatchNorm, compiled.


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(6 * 8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, tokens):
        h = self.bn(self.fc1(self.emb(tokens).flatten(1)))
        return self.fc2(self.drop(torch.relu(h)))


def tagger(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tagger()


def tagger_state(seed: int = 0) -> ftrain.TrainState:
    # SGD: Adam's first step is ~lr * sign(grad), which turns 1e-9 float noise on tiny grads into 1e-2.
    return ftrain.TrainState.create(tagger(seed), optim.sgd(0.1, momentum=0.9), key=random.key(seed))


def tagger_loss(apply, params, buffers, batch, key):
    tokens, y = batch
    logits, buffers = apply(params, buffers, tokens, key=key)
    return nn.functional.cross_entropy(logits, y), {}, buffers


def tagger_batches(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 20, (16, 6), generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def tagger_step() -> ftrain.TrainStep:
    return ftrain.make_train_step(tagger_loss)


@pytest.mark.usefixtures("cold_cache")  # it counts compiles
def test_same_seed_twice_gives_bitwise_identical_params_after_20_compiled_steps(tagger_step):
    batches = tagger_batches(20)

    def run(state):
        for batch in batches:
            state, _ = tagger_step(state, batch)
        return state

    states = [tagger_state(0), tagger_state(0), tagger_state(0).replace(key=random.key(1))]
    rng = torch.get_rng_state()
    first, second, other_key = (run(state) for state in states)
    assert leaves_equal(first, second)
    assert not tree.equal(first.params, other_key.params), "dropout must be driven by the state's key"
    assert torch.equal(torch.get_rng_state(), rng)
    assert tagger_step.num_compiles == 1


def test_dropout_model_compiled_equals_eager_per_step(tagger_step):
    eager_step = ftrain.make_train_step(tagger_loss, compile=False)
    state = tagger_state(0)
    for batch in tagger_batches(3):
        expected, expected_metrics = eager_step(state, batch)
        state, metrics = tagger_step(state, batch)
        assert tree.allclose(state, expected, rtol=1e-5, atol=1e-6)
        assert tree.allclose(metrics, expected_metrics, rtol=1e-5, atol=1e-6)


def test_batchnorm_running_stats_update_as_in_the_module(tagger_step):
    tokens, y = tagger_batches(1)[0]
    new_state, _ = tagger_step(tagger_state(0), (tokens, y))
    reference = tagger(0).train()
    reference(tokens)  # dropout sits after the BatchNorm, so the stats do not depend on masks
    for name in ("bn.running_mean", "bn.running_var"):
        assert torch.allclose(new_state.buffers[name], reference.get_buffer(name), rtol=1e-5, atol=1e-6), name
    assert int(new_state.buffers["bn.num_batches_tracked"]) == 1


# ---------------------------------------------------------------------------------------------
# Precision.


def mse_loss(apply, params, buffers, batch, key):
    x, y = batch
    out, buffers = apply(params, buffers, x)
    return (out.float() - y).square().mean(), {}, buffers


def scaled_state() -> precision.ScaledTrainState:
    torch.manual_seed(0)
    return precision.ScaledTrainState.create(
        nn.Linear(4, 2), optim.sgd(0.1), loss_scale=precision.DynamicScale.create(1024.0)
    )


@pytest.mark.usefixtures("cold_cache")  # it counts compiles
def test_fp16_loss_scaling_skips_an_overflowing_step_and_recovers():
    policy = precision.Policy(torch.float16, growth_interval=2)
    train_step = ftrain.make_train_step(mse_loss, precision=policy)
    eager_step = ftrain.make_train_step(mse_loss, precision=policy, compile=False)
    g = torch.Generator().manual_seed(0)
    good = (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    overflow = (good[0] * 1e5, good[1])  # beyond float16's range: the forward is inf
    state = scaled_state()
    trace = []
    for batch in (good, overflow, good, good):
        expected, _ = eager_step(state, batch)
        new_state, metrics = train_step(state, batch)
        assert tree.allclose(new_state, expected, rtol=1e-3, atol=1e-5)
        trace.append((bool(metrics["grads_finite"]), float(new_state.loss_scale.scale), new_state))
        state = new_state
    assert [(finite, scale) for finite, scale, _ in trace] == [(True, 1024), (False, 512), (True, 512), (True, 1024)]
    after_good, after_overflow = trace[0][2], trace[1][2]
    assert tree.equal(after_overflow.params, after_good.params), "an overflowing step must not update"
    assert tree.equal(after_overflow.opt_state, after_good.opt_state)
    assert int(after_overflow.step) == 2
    assert not tree.equal(trace[2][2].params, after_overflow.params), "training must resume after the back-off"
    assert all(p.dtype == torch.float32 for p in state.params.values()), "master params stay float32"
    assert train_step.num_compiles == 1


def test_an_eager_fp16_donation_still_skips_an_overflowing_step():
    # (Loss scaling keeps the input's values on overflow: the update must not have written them.)
    eager_step = ftrain.make_train_step(mse_loss, precision=precision.Policy(torch.float16), compile=False)
    g = torch.Generator().manual_seed(0)
    good = (torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
    pure = donated = scaled_state()
    for batch in (good, (good[0] * 1e5, good[1]), good):
        pure, _ = eager_step(pure, batch)
        donated, metrics = eager_step.donate(donated, batch)
        assert leaves_equal(donated, pure)
    assert float(donated.loss_scale.scale) == 512


def test_bf16_autocast_runs_the_forward_in_bf16_with_fp32_params():
    seen = []

    def loss_fn(apply, params, buffers, batch, key):
        out, buffers = apply(params, buffers, batch)
        seen.append(out.dtype)
        return out.float().square().mean()

    state = ftrain.TrainState.create(nn.Linear(4, 2), optim.sgd(0.1))
    new_state, _ = ftrain.make_train_step(loss_fn, precision="bf16", compile=False)(state, torch.randn(8, 4))
    assert seen == [torch.bfloat16]
    assert new_state.params["weight"].dtype == torch.float32


def test_loss_scaling_needs_a_state_with_a_loss_scale():
    step = ftrain.make_train_step(mse_loss, precision="fp16")
    state = ftrain.TrainState.create(nn.Linear(4, 2), optim.sgd(0.1))
    with pytest.raises(ftrain.StepError, match="ScaledTrainState"):
        step(state, (torch.randn(8, 4), torch.randn(8, 2)))
    assert step.num_compiles == 0


def test_precision_select_and_all_finite_are_trees_and_its_knobs_are_checked():
    assert precision.select is tree.where and precision.all_finite is tree.all_finite  # one body each
    with pytest.raises(ValueError, match="Policy: growth_interval must be a positive int, got 0"):
        precision.Policy(torch.float16, growth_interval=0)
    with pytest.raises(ValueError, match=r"Policy: backoff_factor must be in \(0, 1\), got 1"):
        precision.Policy(torch.float16, backoff_factor=1)
    with pytest.raises(ValueError, match="DynamicScale.create: init_scale must be a positive number"):
        precision.DynamicScale.create(0.0)


# ---------------------------------------------------------------------------------------------
# Accumulation, prediction.


def test_accumulating_micro_batches_equals_one_big_batch():
    def state():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
        return ftrain.TrainState.create(net, optim.adamw(1e-2))

    def loss_fn(apply, params, buffers, batch, key):
        x, y = batch
        logits, buffers = apply(params, buffers, x)
        return nn.functional.cross_entropy(logits, y), {"n": torch.tensor(1.0)}, buffers

    whole, accumulated = (
        ftrain.make_train_step(loss_fn, compile=False),
        ftrain.make_train_step(loss_fn, compile=False, accumulate=4),
    )
    a, b = state(), state()
    for x, y in mlp_batches(3):
        a, _ = whole(a, (x.double(), y))
        b, metrics = accumulated(b, (x.double(), y))
    assert leaves_close(a, b, rtol=1e-10, atol=1e-12)
    assert float(metrics["n"]) == 1.0
    with pytest.raises(ftrain.StepError, match="divisible by 4"):
        ftrain.make_train_step(loss_fn, compile=False, accumulate=4)(
            state(), (torch.randn(6, 8).double(), torch.zeros(6, dtype=torch.int64))
        )


def test_predict_step_is_the_module_in_eval_mode():
    state = make_mlp_state(0)
    predict_step = ftrain.make_predict_step(compile=False)
    x, y = mlp_batches(1)[0]
    expected = state.to_module().eval()(x)
    assert torch.allclose(predict_step(state, (x, y)), expected)
    assert torch.allclose(predict_step(state, x), expected)


# ---------------------------------------------------------------------------------------------
# A custom step: a GAN with two optimizers in one state.


@dataclasses.dataclass(frozen=True, eq=False)
class GANState(ftrain.TrainState):
    d_params: dict = dataclasses.field(default_factory=dict)
    d_opt_state: Any = None
    d_apply: Any = ftrain.static_field(default=None)
    d_tx: Any = ftrain.static_field(default=None)


def gan_state() -> GANState:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
    discriminator = ftrain.TrainState.create(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)), optim.adam(2e-3)
    )
    return GANState.create(
        generator,
        optim.adam(1e-3),
        d_params=discriminator.params,
        d_opt_state=discriminator.opt_state,
        d_apply=discriminator.apply_fn,
        d_tx=discriminator.tx,
    )


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def gan_noise(state: GANState, n: int) -> torch.Tensor:
    return random.normal(ftrain.step_key(state), (n, 4))


def gan_step(state: GANState, real: torch.Tensor) -> tuple[GANState, dict]:
    z = gan_noise(state, real.shape[0])
    fake, _ = state.apply_fn(state.params, state.buffers, z)

    def d_loss(apply, d_params, buffers, batch, key):
        real, fake = batch
        return bce(apply(d_params, buffers, real)[0], 1.0) + bce(apply(d_params, buffers, fake)[0], 0.0)

    key = ftrain.step_key(state)
    d_grads, d_loss_value, _, _ = ftrain.loss_and_grad(d_loss, state.d_apply, state.d_params, {}, (real, fake), key)
    d_updates, d_opt_state = state.d_tx.update(d_grads, state.d_opt_state, state.d_params)
    d_params = optim.apply_updates(state.d_params, d_updates)

    def g_loss(apply, params, buffers, z, key):
        fake, buffers = apply(params, buffers, z)
        return bce(state.d_apply(d_params, {}, fake)[0], 1.0), {}, buffers

    grads, g_loss_value, _, buffers = ftrain.loss_and_grad(g_loss, state.apply_fn, state.params, state.buffers, z, key)
    new_state = state.apply_gradients(grads, buffers=buffers, d_params=d_params, d_opt_state=d_opt_state)
    return new_state, {"loss": g_loss_value, "d_loss": d_loss_value}


def torch_gan_reference(real_batches: list) -> tuple[dict, dict]:
    """The same GAN with torch.optim.Adam and autograd, for comparison."""
    state = gan_state()
    generator = state.to_module()
    discriminator = state.replace(apply_fn=state.d_apply, params=state.d_params, buffers={}).to_module()
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-3)
    for i, real in enumerate(real_batches):
        z = gan_noise(state.replace(step=torch.tensor(i)), real.shape[0])
        fake = generator(z).detach()
        d_opt.zero_grad()
        (bce(discriminator(real), 1.0) + bce(discriminator(fake), 0.0)).backward()
        d_opt.step()
        g_opt.zero_grad()
        bce(discriminator(generator(z)), 1.0).backward()
        g_opt.step()
    return dict(generator.named_parameters()), dict(discriminator.named_parameters())


@pytest.mark.usefixtures("cold_cache")  # it counts compiles
def test_gan_step_with_two_optimizers_compiles_and_matches_torch():
    step = ftrain.compile_step(gan_step)
    eager = ftrain.compile_step(gan_step, compile=False)
    g = torch.Generator().manual_seed(0)
    reals = [torch.randn(8, 6, generator=g) + 2 for _ in range(3)]
    state = gan_state()
    for real in reals:
        expected, _ = eager(state, real)
        state, metrics = step(state, real)
        assert tree.allclose(state, expected, rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"loss", "d_loss"}
    assert step.num_compiles == 1
    g_ref, d_ref = torch_gan_reference(reals)
    assert tree.allclose(state.params, {k: v.detach() for k, v in g_ref.items()}, rtol=1e-4, atol=1e-6)
    assert tree.allclose(state.d_params, {k: v.detach() for k, v in d_ref.items()}, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: a short error before anything is compiled.


def linear_state() -> ftrain.TrainState:
    torch.manual_seed(0)
    return ftrain.TrainState.create(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), optim.sgd(0.1))


def _logits(apply, params, buffers, batch, key):
    x, _ = batch
    return apply(params, buffers, x, key=key)


def per_sample_loss(apply, params, buffers, batch, key):
    logits, buffers = _logits(apply, params, buffers, batch, key)
    return nn.functional.cross_entropy(logits, batch[1], reduction="none"), {}, buffers


def accuracy_as_loss(apply, params, buffers, batch, key):
    logits, buffers = _logits(apply, params, buffers, batch, key)
    return (logits.argmax(-1) == batch[1]).float().mean(), {}, buffers


def vector_metric(apply, params, buffers, batch, key):
    logits, buffers = _logits(apply, params, buffers, batch, key)
    return nn.functional.cross_entropy(logits, batch[1]), {"logits": logits}, buffers


def good_loss(apply, params, buffers, batch, key):
    logits, buffers = _logits(apply, params, buffers, batch, key)
    return nn.functional.cross_entropy(logits, batch[1]), {}, buffers


X, Y = torch.randn(8, 4), torch.randint(0, 2, (8,))


@pytest.mark.parametrize(
    ("loss_fn", "batch", "message"),
    [
        (per_sample_loss, (X, Y), r"loss of shape \(8,\); it must be a scalar"),
        (accuracy_as_loss, (X, Y), "does not depend on the params"),
        (vector_metric, (X, Y), r"metric 'logits' has shape \(8, 2\)"),
        (good_loss, (torch.randn(8, 5), Y), r"batch of \(tensor\(shape=\(8, 5\).*same reduction dim"),
        (good_loss, (X, Y.float()), "Expected dtype int32/int64 for index"),
        (good_loss, (X, Y[:5]), r"input batch_size \(8\) to match target batch_size \(5\)"),
        (lambda apply, params, buffers, batch, key: "oops", (X, Y), "loss_fn returned str"),
    ],
)
def test_bad_input_is_a_short_clear_error_before_compiling(loss_fn, batch, message):
    step = ftrain.make_train_step(loss_fn)
    with pytest.raises(ftrain.StepError, match=message) as info:
        step(linear_state(), batch)
    assert len(str(info.value).splitlines()) <= 4
    assert step.num_compiles == 0
