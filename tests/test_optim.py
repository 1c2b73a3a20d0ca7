"""ftrain.optim against torch.optim (float64, eager), plus the wrappers' contracts."""

import itertools
import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ftrain import TrainState, optim, random, schedules, tree

STEPS = 100
RTOL = 1e-10


@pytest.fixture
def float64():
    # torch.optim keeps NAdam's mu_product and step counts in the default dtype: make it float64
    # so torch's own bookkeeping is exact too.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def model_params(dtype=torch.float64):
    """A model-shaped tree: matrices, a bias, a conv kernel and a 0-d scale."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (5, 3), "fc1.bias": (5,), "conv.weight": (2, 3, 2, 2), "scale": ()}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def grad_sequence(params, n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()} for _ in range(n)]


def grad_at(noise, params):
    # Gradients that depend (mildly) on the params, like a real loss, without chaotic feedback.
    return {k: noise[k] + 0.1 * torch.tanh(params[k]) for k in params}


def run_ours(tx, p0, noises):
    state, params = tx.init(p0), p0
    for noise in noises:
        updates, state = tx.update(grad_at(noise, params), state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def run_torch(cls, p0, noises, scheduler=None, foreach=False, lrs=None, **kwargs):
    params = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = cls(list(params.values()), foreach=foreach, **kwargs) if cls is not None else None
    sched = scheduler(opt) if scheduler else None
    for i, noise in enumerate(noises):
        grads = grad_at(noise, {k: v.detach() for k, v in params.items()})
        for k, v in params.items():
            v.grad = grads[k]
        for group in opt.param_groups if lrs else ():
            group["lr"] = lrs[i]
        opt.step()
        if sched:
            sched.step()
    return {k: v.detach() for k, v in params.items()}


def assert_same_change(ours, theirs, p0, rtol=RTOL):
    """Compare the change from the initial params, relative to its size (TorchOpt style)."""
    for k in p0:
        d_ours, d_theirs = ours[k] - p0[k], theirs[k] - p0[k]
        scale = d_theirs.abs().max().clamp_min(1e-30)
        err = float((d_ours - d_theirs).abs().max() / scale)
        assert err <= rtol, f"{k}: relative error {err:.3e} > {rtol:g}"


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


# (ours factory, torch class, kwargs in torch's names, a translation to ours). eps is large on
# purpose: a tiny eps would not tell "outside the sqrt" from "inside" within the tolerance.
CASES = []
for kw in grid(
    lr=[0.1, 0.01], momentum=[0.0, 0.9], nesterov=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True]
):
    if kw["nesterov"] and not kw["momentum"]:
        continue
    CASES.append(
        (
            "sgd",
            torch.optim.SGD,
            kw,
            lambda k: optim.sgd(
                k["lr"], k["momentum"] or None, k["nesterov"], weight_decay=k["weight_decay"], maximize=k["maximize"]
            ),
        )
    )
for name, cls in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]:
    for kw in grid(
        lr=[1e-2],
        betas=[(0.9, 0.999), (0.5, 0.9)],
        eps=[1e-3],
        weight_decay=[0.0, 0.1],
        amsgrad=[False, True],
        maximize=[False, True],
    ):
        fn = getattr(optim, name)
        CASES.append(
            (
                name,
                cls,
                kw,
                lambda k, fn=fn: fn(
                    k["lr"],
                    *k["betas"],
                    k["eps"],
                    weight_decay=k["weight_decay"],
                    amsgrad=k["amsgrad"],
                    maximize=k["maximize"],
                ),
            )
        )
for kw in grid(
    lr=[1e-2], alpha=[0.99, 0.8], eps=[1e-2], momentum=[0.0, 0.5], centered=[False, True],
    weight_decay=[0.0, 0.1], maximize=[False, True],
):  # fmt: skip
    CASES.append(
        (
            "rmsprop",
            torch.optim.RMSprop,
            kw,
            lambda k: optim.rmsprop(
                k["lr"],
                k["alpha"],
                k["eps"],
                momentum=k["momentum"] or None,
                centered=k["centered"],
                weight_decay=k["weight_decay"],
                maximize=k["maximize"],
            ),
        )
    )
for kw in grid(
    lr=[0.1], lr_decay=[0.0, 0.05], weight_decay=[0.0, 0.1], initial_accumulator_value=[0.0, 0.3],
    eps=[1e-2], maximize=[False, True],
):  # fmt: skip
    CASES.append(
        (
            "adagrad",
            torch.optim.Adagrad,
            kw,
            lambda k: optim.adagrad(
                k["lr"],
                k["lr_decay"],
                k["weight_decay"],
                k["initial_accumulator_value"],
                k["eps"],
                maximize=k["maximize"],
            ),
        )
    )
for kw in grid(
    lr=[1e-2], betas=[(0.9, 0.999), (0.5, 0.9)], weight_decay=[0.0, 0.1], momentum_decay=[4e-3, 2e-2],
    decoupled_weight_decay=[False, True], maximize=[False, True],
):  # fmt: skip
    CASES.append(
        (
            "nadam",
            torch.optim.NAdam,
            kw,
            lambda k: optim.nadam(
                k["lr"],
                *k["betas"],
                weight_decay=k["weight_decay"],
                momentum_decay=k["momentum_decay"],
                decoupled_weight_decay=k["decoupled_weight_decay"],
                maximize=k["maximize"],
            ),
        )
    )
for kw in grid(
    lr=[1e-2], betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-3], weight_decay=[0.0, 0.1],
    decoupled_weight_decay=[False, True], maximize=[False, True],
):  # fmt: skip
    CASES.append(
        (
            "radam",
            torch.optim.RAdam,
            kw,
            lambda k: optim.radam(
                k["lr"],
                *k["betas"],
                k["eps"],
                weight_decay=k["weight_decay"],
                decoupled_weight_decay=k["decoupled_weight_decay"],
                maximize=k["maximize"],
            ),
        )
    )


def _case_id(case):
    name, _, kw, _ = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "lr" or name in ("sgd",))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_equals_torch_optim(case, float64):
    name, cls, kw, make = case
    p0 = model_params()
    noises = grad_sequence(p0)
    ours, _ = run_ours(make(kw), p0, noises)
    theirs = run_torch(cls, p0, noises, **kw)
    assert_same_change(ours, theirs, p0)


def test_grid_covers_every_torch_optimizer():
    covered = {name for name, *_ in CASES}
    assert covered == {"sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam", "radam"}


def test_learning_rate_schedule_equals_torch_scheduler(float64):
    """``learning_rate=schedule`` == torch.optim with the matching lr_scheduler stepped each step."""
    p0 = model_params()
    noises = grad_sequence(p0)
    ours, _ = run_ours(optim.adamw(schedules.cosine_decay(1e-2, STEPS, alpha=0.1), weight_decay=0.1), p0, noises)
    theirs = run_torch(
        torch.optim.AdamW,
        p0,
        noises,
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-3),
        lr=1e-2,
        weight_decay=0.1,
    )
    assert_same_change(ours, theirs, p0, rtol=1e-9)


def test_set_hyperparams_equals_changing_torch_param_group(float64):
    p0 = model_params()
    noises = grad_sequence(p0)
    tx = optim.inject_hyperparams(optim.adam)(learning_rate=1e-2, b1=0.9)
    state, params = tx.init(p0), p0
    for i, noise in enumerate(noises):
        if i == 40:
            state = optim.set_hyperparams(state, learning_rate=3e-3, b1=0.7)
        updates, state = tx.update(grad_at(noise, params), state, params)
        params = optim.apply_updates(params, updates)

    torch_params = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = torch.optim.Adam(list(torch_params.values()), lr=1e-2, betas=(0.9, 0.999), foreach=False)
    for i, noise in enumerate(noises):
        if i == 40:
            opt.param_groups[0]["lr"] = 3e-3
            opt.param_groups[0]["betas"] = (0.7, 0.999)
        grads = grad_at(noise, {k: v.detach() for k, v in torch_params.items()})
        for k, v in torch_params.items():
            v.grad = grads[k]
        opt.step()
    assert_same_change(params, {k: v.detach() for k, v in torch_params.items()}, p0)
    assert float(optim.get_hyperparams(state)["learning_rate"]) == 3e-3


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_by_global_norm_equals_clip_grad_norm(max_norm, dtype):
    grads = grad_sequence(model_params(dtype), n=1)[0]
    clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.clip_by_global_norm(max_norm).init(grads))
    holders = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for h, g in zip(holders, grads.values()):
        h.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(holders, max_norm, foreach=False)
    assert float(total) == pytest.approx(float(tree.global_norm(grads)), rel=1e-6)
    assert (float(total) > max_norm) == (max_norm < 1e3), "the grid must cover clipping and not clipping"
    for ours, h in zip(clipped.values(), holders):
        torch.testing.assert_close(ours, h.grad, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)


def test_clip_by_value_equals_clip_grad_value():
    grads = grad_sequence(model_params(), n=1)[0]
    clipped, _ = optim.clip(0.5).update(grads, optim.clip(0.5).init(grads))
    holders = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for h, g in zip(holders, grads.values()):
        h.grad = g.clone()
    torch.nn.utils.clip_grad_value_(holders, 0.5, foreach=False)
    for ours, h in zip(clipped.values(), holders):
        assert torch.equal(ours, h.grad)
    assert float(max(g.abs().max() for g in grads.values())) > 0.5


def test_ema_params_equals_averaged_model(float64):
    p0 = model_params()
    noises = grad_sequence(p0, n=20)
    decay = 0.9
    tx = optim.chain(optim.sgd(0.1, 0.9), optim.ema_params(decay))
    _, state = run_ours(tx, p0, noises)

    module = torch.nn.Module()
    for k, v in p0.items():
        module.register_parameter(k.replace(".", "_"), torch.nn.Parameter(v.clone()))
    averaged = torch.optim.swa_utils.AveragedModel(
        module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    )
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, foreach=False)
    for noise in noises:
        current = {k: getattr(module, k.replace(".", "_")).detach() for k in p0}
        grads = grad_at(noise, current)
        for k in p0:
            getattr(module, k.replace(".", "_")).grad = grads[k]
        opt.step()
        averaged.update_parameters(module)
    for k in p0:
        torch.testing.assert_close(
            state[-1].ema[k], getattr(averaged.module, k.replace(".", "_")).detach(), rtol=1e-12, atol=1e-14
        )


def reference_lion(p0, noises, lr, b1, b2, wd):
    """Lion as written in the paper's pseudo-code (Chen et al. 2023, Algorithm 2)."""
    params = {k: v.clone() for k, v in p0.items()}
    m = {k: torch.zeros_like(v) for k, v in p0.items()}
    for noise in noises:
        g = grad_at(noise, params)
        for k in params:
            c = b1 * m[k] + (1 - b1) * g[k]
            params[k] = params[k] - lr * (torch.sign(c) + wd * params[k])
            m[k] = b2 * m[k] + (1 - b2) * g[k]
    return params


@pytest.mark.parametrize("b1,b2,wd", [(0.9, 0.99, 0.0), (0.95, 0.98, 0.1)])
def test_lion_equals_reference(b1, b2, wd, float64):
    p0 = model_params()
    noises = grad_sequence(p0)
    ours, _ = run_ours(optim.lion(1e-3, b1, b2, wd), p0, noises)
    assert_same_change(ours, reference_lion(p0, noises, 1e-3, b1, b2, wd), p0)


def test_inject_hyperparams_keeps_the_numbers(float64):
    p0 = model_params()
    noises = grad_sequence(p0)
    lr = schedules.warmup_cosine_decay(0.0, 1e-2, 10, STEPS)
    plain, _ = run_ours(optim.adamw(lr, weight_decay=0.1), p0, noises)
    injected, state = run_ours(optim.inject_hyperparams(optim.adamw)(lr, weight_decay=0.1), p0, noises)
    assert_same_change(injected, plain, p0, rtol=1e-12)
    hp = optim.get_hyperparams(state)
    assert hp["learning_rate"].dtype == torch.float64 and hp["weight_decay"].shape == ()
    assert float(hp["learning_rate"]) == pytest.approx(float(lr(torch.tensor(STEPS - 1))), rel=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam", "radam", "lion"])
def test_inject_hyperparams_works_for_every_named_optimizer(name, float64):
    p0 = model_params()
    noises = grad_sequence(p0, n=20)
    make = getattr(optim, name)
    extra = {"sgd": {"momentum": 0.9}, "rmsprop": {"momentum": 0.5, "centered": True}, "adagrad": {"lr_decay": 0.1}}
    plain, _ = run_ours(make(1e-2, **extra.get(name, {})), p0, noises)
    injected, state = run_ours(optim.inject_hyperparams(make)(1e-2, **extra.get(name, {})), p0, noises)
    assert_same_change(injected, plain, p0, rtol=1e-13)
    assert all(v.shape == () and v.dtype == torch.float64 for v in optim.get_hyperparams(state).values())


def test_inject_hyperparams_keeps_low_precision_params_sane():
    params = {"w": torch.ones(4, dtype=torch.bfloat16)}
    tx = optim.inject_hyperparams(optim.adam)(1e-2)
    state = tx.init(params)
    assert optim.get_hyperparams(state)["b2"].dtype == torch.float32  # 0.999 is 1.0 in bfloat16
    updates, state = tx.update({"w": torch.full((4,), 0.5, dtype=torch.bfloat16)}, state, params)
    assert updates["w"].dtype == torch.bfloat16 and torch.allclose(
        updates["w"].float(), torch.full((4,), -1e-2), rtol=1e-2
    )


# --- wrappers --------------------------------------------------------------------------------


def tiny_regression(n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = torch.randn(n, 2, generator=g, dtype=dtype)
    params = {"w": torch.randn(3, 2, generator=g, dtype=dtype), "b": torch.zeros(2, dtype=dtype)}
    return params, x, y


def mse_grad(params, x, y):
    return torch.func.grad(lambda p: ((x @ p["w"] + p["b"] - y) ** 2).mean())(params)


@pytest.mark.parametrize("k", [2, 4])
def test_multisteps_equals_one_step_on_the_concatenated_batch(k):
    params, x, y = tiny_regression(n=16)
    big = optim.adamw(0.05, weight_decay=0.1)
    acc = optim.MultiSteps(optim.adamw(0.05, weight_decay=0.1), every_k_schedule=k)
    big_state, acc_state = big.init(params), acc.init(params)
    p_big, p_acc = params, params
    for _ in range(3):  # three optimizer steps
        updates, big_state = big.update(mse_grad(p_big, x, y), big_state, p_big)
        p_big = optim.apply_updates(p_big, updates)
        for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k))):
            updates, acc_state = acc.update(mse_grad(p_acc, xs, ys), acc_state, p_acc)
            p_acc = optim.apply_updates(p_acc, updates)
            assert bool(optim.MultiSteps.has_updated(acc_state)) == (i == k - 1)
    assert tree.allclose(p_acc, p_big, rtol=1e-12, atol=1e-14)
    assert int(acc_state.gradient_step) == 3 and int(acc_state.mini_step) == 0


def test_apply_if_finite_skips_and_counts():
    params = {"w": torch.ones(3), "b": torch.zeros(1)}
    tx = optim.apply_if_finite(optim.adam(0.1), max_consecutive_errors=2)
    good = {"w": torch.ones(3), "b": torch.ones(1)}
    bad = {"w": torch.tensor([1.0, float("nan"), 1.0]), "b": torch.tensor([float("inf")])}
    state = tx.init(params)
    updates, state = tx.update(good, state, params)
    inner_after_good = state.inner_state
    for i in range(2):
        updates, state = tx.update(bad, state, params)
        assert all(bool((u == 0).all()) for u in tree.leaves(updates)), "a non-finite step must not move params"
        assert tree.equal(state.inner_state, inner_after_good), "a skipped step must not touch the inner state"
        assert int(state.notfinite_count) == i + 1 and not bool(state.last_finite)
    # the third in a row exceeds max_consecutive_errors: applied, so a broken run surfaces
    updates, state = tx.update(bad, state, params)
    assert not bool(torch.isfinite(updates["w"]).all())
    assert int(state.total_notfinite) == 3
    updates, state = tx.update(good, state, params)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 3


def test_partition_equals_separate_optimizers(float64):
    p0 = model_params()
    noises = grad_sequence(p0, n=10)
    labels = {k: ("head" if k.startswith("fc1") else "body") for k in p0}
    tx = optim.partition({"head": optim.adam(1e-2), "body": optim.sgd(0.1, 0.9)}, labels)
    ours, _ = run_ours(tx, p0, noises)
    for label, sub in [("head", optim.adam(1e-2)), ("body", optim.sgd(0.1, 0.9))]:
        keys = [k for k in p0 if labels[k] == label]
        sub_ours, _ = run_ours(sub, {k: p0[k] for k in keys}, [{k: n[k] for k in keys} for n in noises])
        for k in keys:
            assert torch.equal(ours[k], sub_ours[k])


def test_mask_inside_partition_may_cover_the_group_or_all_params():
    params = {"a.w": torch.ones(2), "a.b": torch.ones(2), "b.w": torch.ones(2)}
    labels = {"a.w": "a", "a.b": "a", "b.w": "b"}
    for mask in [{"a.w": True, "a.b": False}, {"a.w": True, "a.b": False, "b.w": True}]:
        tx = optim.partition({"a": optim.masked(optim.set_to_zero(), mask), "b": optim.sgd(1.0)}, labels)
        updates, _ = tx.update(tree.ones_like(params), tx.init(params), params)
        assert [float(updates[k][0]) for k in ["a.w", "a.b", "b.w"]] == [0.0, 1.0, -1.0]


def test_partition_with_a_function_and_a_frozen_group():
    params = {"backbone.w": torch.ones(2), "head.w": torch.ones(2)}
    tx = optim.partition(
        {"frozen": optim.set_to_zero(), "train": optim.sgd(1.0)},
        lambda p: {k: "frozen" if k.startswith("backbone") else "train" for k in p},
    )
    updates, _ = tx.update(tree.ones_like(params), tx.init(params), params)
    assert torch.equal(updates["backbone.w"], torch.zeros(2))
    assert torch.equal(updates["head.w"], -torch.ones(2))


def test_adamw_mask_limits_decay(float64):
    p0 = model_params()
    noises = grad_sequence(p0, n=10)
    mask = {k: k.endswith("weight") for k in p0}
    ours, _ = run_ours(optim.adamw(1e-2, weight_decay=0.5, mask=mask), p0, noises)
    for k in p0:
        wd = 0.5 if mask[k] else 0.0
        ref, _ = run_ours(optim.adamw(1e-2, weight_decay=wd), {k: p0[k]}, [{k: n[k]} for n in noises])
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-14, atol=1e-15)


def test_vmap_over_stacked_optimizer_states():
    """Eight seeds at once (torch.func.vmap over a stacked state) == one at a time; every block
    that keeps a placeholder in its state (adam without amsgrad, rms not centered, masked) too."""
    mask = {"w": True, "b": False}
    tx = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.partition(
            {"a": optim.inject_hyperparams(optim.adamw)(schedules.warmup_cosine_decay(0.0, 1e-2, 3, 20), mask=mask)},
            {"w": "a", "b": "a"},
        ),
        optim.masked(optim.rmsprop(1e-3), mask),
        optim.ema_params(0.9),
    )
    g = torch.Generator().manual_seed(0)
    params = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)} for _ in range(4)]
    grads = [tree.map(lambda x: torch.randn(x.shape, generator=g), p) for p in params]

    def update(p, s, g):
        u, s = tx.update(g, s, p)
        return optim.apply_updates(p, u), s

    states = [tx.init(p) for p in params]
    p_stacked, s_stacked = tree.stack(params), tree.stack(states)
    for _ in range(3):
        p_stacked, s_stacked = torch.func.vmap(update)(p_stacked, s_stacked, tree.stack(grads))
    for i, (p, s) in enumerate(zip(params, states)):
        for _ in range(3):
            p, s = update(p, s, grads[i])
        assert tree.allclose(tree.unstack(p_stacked)[i], p, rtol=1e-6, atol=1e-7)
        assert tree.allclose(tree.unstack(s_stacked)[i], s, rtol=1e-6, atol=1e-7)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [optim.sgd, optim.adam, optim.adamw, optim.rmsprop, optim.adagrad, optim.lion])
def test_negative_learning_rate_is_refused(make):
    with pytest.raises(ValueError, match=r"learning_rate must be in \[0.0, inf\], got -0.1"):
        make(-0.1)


@pytest.mark.parametrize("b1", [1.0, -0.1, 1.5])
def test_b1_outside_unit_interval_is_refused(b1):
    with pytest.raises(ValueError, match=rf"b1 must be in \[0.0, 1.0\), got {b1}"):
        optim.adam(1e-3, b1=b1)
    with pytest.raises(ValueError, match=r"b1 must be in"):
        optim.inject_hyperparams(optim.adamw)(1e-3, b1=b1)


def test_mask_structure_mismatch_names_the_leaf():
    params = {"fc.weight": torch.ones(2), "fc.bias": torch.ones(1)}
    tx = optim.adamw(1e-3, mask={"fc.weight": True, "fc.bais": False})
    with pytest.raises(ValueError, match=r"mask.*missing in mask: \['fc.bias'\].*unexpected in mask: \['fc.bais'\]"):
        tx.init(params)
    tx = optim.masked(optim.sgd(0.1), {"fc.weight": True, "fc.bias": "yes"})
    with pytest.raises(TypeError, match=r"mask\['fc.bias'\] is 'yes'"):
        tx.init(params)


def test_partition_label_without_optimizer_names_the_leaf():
    params = {"g.weight": torch.ones(2), "d.weight": torch.ones(2), "d.bias": torch.ones(1)}
    labels = {"g.weight": "gen", "d.weight": "disc", "d.bias": "disc"}
    tx = optim.partition({"gen": optim.adam(1e-3)}, labels)
    with pytest.raises(ValueError, match=r"label 'disc' on params\['d.bias'\], params\['d.weight'\].*labels \['gen'\]"):
        tx.init(params)


def test_other_bad_inputs_are_clear():
    with pytest.raises(TypeError, match="chain.. argument 1 is a SGD"):
        optim.chain(optim.identity(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(ValueError, match="every_k_schedule must be an int >= 1"):
        optim.MultiSteps(optim.sgd(0.1), 0)
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        optim.sgd(0.1, nesterov=True)
    state = optim.inject_hyperparams(optim.sgd)(0.1).init({"w": torch.ones(1)})
    with pytest.raises(KeyError, match=r"no injected hyperparameter named \['lr'\].*'learning_rate'"):
        optim.set_hyperparams(state, lr=0.01)
    with pytest.raises(ValueError, match="learning_rate must be >= 0, got -1"):
        optim.set_hyperparams(state, learning_rate=-1.0)
    with pytest.raises(ValueError, match="chain of 2 transformations got a tuple of 1 states"):
        tx = optim.chain(optim.identity(), optim.identity())
        tx.update({"w": torch.ones(1)}, (optim.EmptyState(),))
    with pytest.raises(ValueError, match="add_decayed_weights needs the current params"):
        tx = optim.adamw(0.1)
        tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))


# --- properties (hypothesis) -----------------------------------------------------------------

TRANSFORMS = {
    "sgd": lambda: optim.sgd(0.1, 0.9, True, weight_decay=0.01),
    "adam": lambda: optim.adam(1e-2, amsgrad=True),
    "adamw": lambda: optim.adamw(schedules.linear(1e-2, 0.0, 5)),
    "rmsprop": lambda: optim.rmsprop(1e-2, centered=True, momentum=0.5),
    "lion": lambda: optim.lion(1e-3),
    "clip": lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adagrad(0.1)),
}

leaf_shapes = st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=2), min_size=1, max_size=4)
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(tuple(s), generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}


@PROPERTY
@given(shapes=leaf_shapes, name=st.sampled_from(sorted(TRANSFORMS)), seed=st.integers(0, 100))
def test_chain_with_identity_is_the_same_transform(shapes, name, seed):
    params = _params(shapes, seed)
    tx, wrapped = TRANSFORMS[name](), optim.chain(optim.identity(), TRANSFORMS[name]())
    s1, s2 = tx.init(params), wrapped.init(params)
    for i in range(3):
        grads = _params(shapes, seed + 1 + i)
        u1, s1 = tx.update(grads, s1, params)
        u2, s2 = wrapped.update(grads, s2, params)
        assert tree.equal(u1, u2)
        assert tree.equal(s1, s2[1])


@PROPERTY
@given(shapes=leaf_shapes, seed=st.integers(0, 100))
def test_apply_zero_updates_is_identity(shapes, seed):
    params = _params(shapes, seed)
    assert tree.equal(optim.apply_updates(params, tree.zeros_like(params)), params)


@PROPERTY
@given(
    shapes=leaf_shapes, flags=st.lists(st.booleans(), min_size=4, max_size=4), name=st.sampled_from(sorted(TRANSFORMS))
)
def test_masked_leaves_are_untouched(shapes, flags, name):
    params = _params(shapes, 0)
    mask = {k: flags[i] for i, k in enumerate(params)}
    tx = optim.masked(TRANSFORMS[name](), mask)
    state = tx.init(params)
    for i in range(2):
        grads = _params(shapes, 1 + i)
        updates, state = tx.update(grads, state, params)
        for k in params:
            if not mask[k]:
                assert updates[k] is grads[k]
            else:
                assert not math.isnan(float(updates[k].sum()))


# --- compile ---------------------------------------------------------------------------------


def _tiny_problem() -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A 2-layer tanh regression: params, inputs, targets (seeded)."""
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(4, 8, generator=g), "b1": torch.zeros(8), "w2": torch.randn(8, 1, generator=g)}
    return params, torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def _steps(tx, counter):
    """The pure step ``(params, opt_state, x, y) -> (params, opt_state, loss)`` with ``tx``, and it compiled."""

    def loss_fn(p, x, y):
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2).mean()

    def step(p, opt_state, x, y):
        grads, loss = torch.func.grad_and_value(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optim.apply_updates(p, updates), opt_state, loss

    return step, torch.compile(step, fullgraph=True, backend=counter)


# torch's inductor imports a deprecated torch.jit API the first time it loads (torch's own noise).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_once_over_50_steps_with_changing_hyperparams():
    """adamw + warmup_cosine_decay + clip_by_global_norm in one fullgraph region: 1 compile, ever."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    params, x, y = _tiny_problem()
    tx = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.inject_hyperparams(optim.adamw)(
            learning_rate=schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=5, decay_steps=50), weight_decay=0.01
        ),
    )

    step, compiled = _steps(tx, counter)

    def run(fn):
        p, s = params, tx.init(params)
        lrs = []
        for i in range(50):
            if i == 20:
                s = optim.set_hyperparams(s, weight_decay=0.1)
            if i == 30:
                s = optim.set_hyperparams(s, b1=0.8, eps=1e-6)
            p, s, _ = fn(p, s, x, y)
            lrs.append(float(optim.get_hyperparams(s)["learning_rate"]))
        return p, lrs

    with torch.no_grad():
        p_compiled, lrs = run(compiled)
        p_eager, _ = run(step)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert lrs[4] == pytest.approx(8e-3) and lrs[5] == pytest.approx(1e-2) and lrs[-1] < lrs[10]
    assert tree.allclose(p_compiled, p_eager, rtol=1e-4, atol=1e-5)


def test_wrappers_compile_once_and_match_eager():
    """MultiSteps(apply_if_finite(partition(masked adamw | nesterov sgd))) + ema: one graph, eager's numbers."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    params, x, y = _tiny_problem()
    groups = optim.partition(
        {
            # the mask covers only this group's params: the others are not its business
            # inject_hyperparams rebuilds the masked adamw at every update: the compiled update
            # must still find the mask worked out at init
            "a": optim.inject_hyperparams(optim.adamw)(schedules.one_cycle(10, 1e-2), mask={"w1": True, "w2": False}),
            "b": optim.sgd(schedules.piecewise_constant(0.1, {3: 0.5}), 0.9, nesterov=True),
        },
        {"w1": "a", "b1": "b", "w2": "a"},
    )
    tx = optim.chain(
        optim.MultiSteps(optim.apply_if_finite(optim.chain(optim.clip(1.0), groups)), every_k_schedule=2),
        optim.ema_params(0.9),
    )

    step, compiled = _steps(tx, counter)

    def run(fn):
        p, s = params, tx.init(params)
        for i in range(12):
            p, s, _ = fn(p, s, x, y * float("nan") if i == 5 else y)
        return p, s

    with torch.no_grad():
        compiled_out, eager_out = run(compiled), run(step)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert tree.allclose(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    multi = compiled_out[1][0]
    assert int(multi.inner_opt_state.total_notfinite) == 1 and int(multi.gradient_step) == 6


def test_non_finite_float_hyperparameters_are_refused():
    with pytest.raises(ValueError, match=r"adam: learning_rate must be in \[0.0, inf\], got nan"):
        optim.adam(float("nan"))
    with pytest.raises(ValueError, match="set_hyperparams: learning_rate must be >= 0, got nan"):
        state = optim.inject_hyperparams(optim.sgd)(0.1).init({"w": torch.ones(1)})
        optim.set_hyperparams(state, learning_rate=float("nan"))


class _TensorOpsOnly(TorchDispatchMode):
    """Under a dispatch mode nothing is read on the host: an update computes its scalars as tensor ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_adam_host_scalars_equal_the_tensor_ops(amsgrad, dtype):
    # Eager on the CPU, Adam's bias corrections are Python floats: bitwise the float64 tensor ops.
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(33, 7, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype)}
    tx = optim.adamw(1e-2, amsgrad=amsgrad)
    host, ops = tx.init(params), tx.init(params)
    for _ in range(300):  # (the step counts where Python's and torch's square roots would round apart)
        grads = tree.map(lambda p: torch.randn(p.shape, generator=g).to(dtype), params)
        u_host, host = tx.update(grads, host, params)
        with _TensorOpsOnly():
            u_ops, ops = tx.update(grads, ops, params)
        assert tree.equal(u_host, u_ops) and tree.equal(host, ops)


def test_global_norm_foreach_equals_per_leaf_norms():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        t = {f"k{i}": (torch.randn(50 * i + 1, generator=g) * 100).to(dtype) for i in range(9)}
        with _TensorOpsOnly():  # (per-leaf norms)
            per_leaf = tree.global_norm(t)
        assert torch.equal(tree.global_norm(t), per_leaf) and tree.global_norm(t).dtype == per_leaf.dtype


# --- the eager fused path: TrainState.apply_gradients in torch.optim's foreach kernels -------------

FUSED_CASES = [c for c in CASES if c[0] in ("sgd", "adam", "adamw")]


def bare_state(tx, p0):
    """A state over a plain params dict (no module: nothing frozen)."""
    step = torch.zeros((), dtype=torch.int64)
    return TrainState(step, dict(p0), {}, tx.init(p0), random.key(0), apply_fn=None, tx=tx)


def counting(tx, calls):
    """``tx`` with an ``update`` that counts its calls: the chain ran (the fused path did not)."""

    def update(*args, **kwargs):
        calls.append(1)
        return tx.update(*args, **kwargs)

    return tx._replace(update=update)


def run_state(tx, p0, noises):
    state = bare_state(tx, p0)
    for noise in noises:
        state = state.apply_gradients(grad_at(noise, state.params))
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", FUSED_CASES, ids=[_case_id(c) for c in FUSED_CASES])
def test_apply_gradients_is_bitwise_torch_optim_foreach(case, dtype):
    name, cls, kw, make = case
    p0 = model_params(dtype)
    noises = grad_sequence(p0, n=20)
    calls = []
    state = run_state(counting(make(kw), calls), p0, noises)
    theirs = run_torch(cls, p0, noises, foreach=True, **kw)
    assert not calls, "the fused path was not taken"
    assert tree.equal(state.params, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_schedule_is_bitwise_torch_and_reports_the_chains_lr(dtype):
    schedule = schedules.warmup_cosine_decay(0.0, 1e-2, 3, 20)
    p0 = model_params(dtype)
    noises = grad_sequence(p0, n=20)
    calls = []
    tx = counting(optim.adamw(schedule, weight_decay=0.1, amsgrad=True), calls)
    state = run_state(tx, p0, noises)
    lrs = [float(schedule(torch.tensor(i))) for i in range(20)]
    theirs = run_torch(torch.optim.AdamW, p0, noises, foreach=True, lrs=lrs, weight_decay=0.1, amsgrad=True)
    assert not calls and tree.equal(state.params, theirs)
    grads = grad_at(noises[0], state.params)
    _, fused = optim.record(state.apply_gradients, grads)
    (_, _), chain = optim.record(tx.update, grads, state.opt_state, state.params)
    assert len(calls) == 1 and fused.keys() == chain.keys() == {"lr"} and torch.equal(fused["lr"], chain["lr"])


FUSED_TXS = {
    "adamw": lambda: optim.adamw(1e-2),
    "adam-amsgrad-maximize-l2": lambda: optim.adam(1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    "adamw-schedule-no-decay": lambda: optim.adamw(schedules.cosine_decay(1e-2, 10), weight_decay=0.0),
    "sgd": lambda: optim.sgd(0.1),
    "sgd-nesterov-schedule": lambda: optim.sgd(schedules.linear(0.1, 0.0, 10), 0.9, True, weight_decay=0.1),
}


@pytest.mark.parametrize("name", FUSED_TXS)
def test_fused_state_is_the_chains_state(name):
    """Types, structure and dtypes as the chain keeps them (checkpoints, compiled steps and
    inject_hyperparams see one state), and the values to rounding."""
    tx, calls = FUSED_TXS[name](), []
    p0 = model_params(torch.float32)
    noises = grad_sequence(p0, n=3)
    chain_params, chain_state = run_ours(tx, p0, noises)
    fused = run_state(counting(tx, calls), p0, noises)
    assert not calls, "the fused path was not taken"
    assert tree.structure(fused.opt_state) == tree.structure(chain_state)
    assert [x.dtype for x in tree.leaves(fused.opt_state)] == [x.dtype for x in tree.leaves(chain_state)]
    assert tree.allclose(fused.opt_state, chain_state, rtol=1e-5, atol=1e-7)
    assert tree.allclose(fused.params, chain_params, rtol=1e-5, atol=1e-7)


def test_frozen_params_stay_as_they_are_on_the_fused_path():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    calls = []
    state = TrainState.create(model, counting(optim.adamw(1e-2, weight_decay=0.1), calls))
    frozen = state.params["bias"]
    reference = torch.optim.AdamW([weight.requires_grad_(True)], lr=1e-2, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(2, 3, generator=g)
        state = state.apply_gradients({"weight": grad})
        weight.grad = grad
        reference.step()
    assert not calls and state.params["bias"] is frozen and torch.equal(frozen, bias)
    assert torch.equal(state.params["weight"], weight.detach())


def test_tensor_hyperparams_and_masks_keep_the_chain(float64):
    """Injected hyperparameters (tensors in the state) and a decay mask have no fused path; the
    chain stays within 1e-10 of torch.optim."""
    mask = {k: k.endswith("weight") for k in model_params()}
    assert optim.inject_hyperparams(optim.adamw)(1e-2).fused_apply is None
    assert optim.adamw(1e-2, mask=mask).fused_apply is None
    assert optim.sgd(torch.tensor(0.1)).fused_apply is None
    assert optim.chain(optim.adamw(1e-2), optim.ema_params(0.9)).fused_apply is None
    p0 = model_params()
    noises = grad_sequence(p0, n=20)
    state = run_state(optim.inject_hyperparams(optim.adamw)(1e-2, weight_decay=0.1), p0, noises)
    assert_same_change(
        state.params, run_torch(torch.optim.AdamW, p0, noises, foreach=True, lr=1e-2, weight_decay=0.1), p0
    )


def test_under_vmap_and_compile_apply_gradients_runs_the_chain():
    tx = optim.adamw(1e-2, weight_decay=0.1, amsgrad=True)
    p0 = model_params(torch.float32)
    grads = grad_at(grad_sequence(p0, n=1)[0], p0)
    chain_params, chain_state = run_ours(tx, p0, [grad_sequence(p0, n=1)[0]])
    calls = []
    state = bare_state(counting(tx, calls), p0)
    stacked = torch.func.vmap(TrainState.apply_gradients)(tree.stack([state, state]), tree.stack([grads, grads]))
    assert len(calls) == 1
    for member in tree.unstack(stacked):
        assert tree.allclose(member.params, chain_params) and tree.allclose(member.opt_state, chain_state)
    compiled = torch.compile(TrainState.apply_gradients, backend="eager", fullgraph=True)(state, grads)
    assert len(calls) == 2
    assert tree.allclose(compiled.params, chain_params) and tree.allclose(compiled.opt_state, chain_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_chain_ending_in_a_named_optimizer_applies_it_fused(dtype):
    """``chain(clip, adamw)``: the clip's updates go to AdamW's fused apply; the state is the chain's,
    the grad norm is reported, and the params are torch's clip_grad_norm_ + AdamW(foreach=True)'s
    (to rounding: the clip's norm is ftrain's)."""
    p0 = model_params(dtype)
    noises = grad_sequence(p0, n=20)
    inner_calls, calls = [], []
    adamw = counting(optim.adamw(1e-2, weight_decay=0.1), inner_calls)
    tx = counting(optim.chain(optim.clip_by_global_norm(1.0), adamw), calls)
    state = run_state(tx, p0, noises)
    assert not calls and not inner_calls
    chain_params, chain_state = run_ours(tx, p0, noises)
    assert tree.structure(state.opt_state) == tree.structure(chain_state)
    assert tree.allclose(state.opt_state, chain_state) and tree.allclose(state.params, chain_params)
    params = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1, foreach=True)
    for noise in noises:
        grads = grad_at(noise, {k: v.detach() for k, v in params.items()})
        for k, v in params.items():
            v.grad = grads[k]
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, foreach=True)
        opt.step()
    assert_same_change(
        state.params, {k: v.detach() for k, v in params.items()}, p0, rtol=1e-5 if dtype == torch.float32 else RTOL
    )
    grads = grad_at(noises[0], state.params)
    _, reported = optim.record(state.apply_gradients, grads, gradients=grads)
    assert sorted(reported) == ["grad_norm", "lr"]


def test_another_optimizers_state_gets_the_chains_error():
    params = model_params(torch.float32)
    injected = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2).init(params)  # (3 fields, like adamw's chain)
    cases = [(optim.sgd(0.1, 0.9).init(params), "a tuple of 2 states"), ({"mu": params}, "dict"),
             (injected, "InjectHyperparamsState")]  # fmt: skip
    for other, got in cases:
        state = bare_state(optim.adamw(1e-2), params).replace(opt_state=other)
        with pytest.raises(ValueError, match=f"chain of 3 transformations got {got}"):
            state.apply_gradients(tree.ones_like(params))
