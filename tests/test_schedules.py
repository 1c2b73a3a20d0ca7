"""ftrain.schedules step by step against torch.optim.lr_scheduler."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftrain import optim, schedules

LR = 0.1


def torch_lrs(make_scheduler, steps, lr=LR, momentum=0.9):
    """The learning rate torch uses at each of ``steps`` optimizer steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def ours(schedule, steps):
    return [float(schedule(torch.tensor(t))) for t in range(steps)]


def assert_lrs_equal(a, b, scale=LR, rtol=1e-12):
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * scale, f"step {t}: ours {x!r} vs torch {y!r}"


S = torch.optim.lr_scheduler

CASES = {
    "LinearLR": (
        lambda o: S.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=10),
        schedules.linear(LR * 0.25, LR, transition_steps=10),
    ),
    "LinearLR-decay": (
        lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=7),
        schedules.linear(LR, LR * 0.1, transition_steps=7),
    ),
    "CosineAnnealingLR": (
        lambda o: S.CosineAnnealingLR(o, T_max=30, eta_min=0.0),
        schedules.cosine_decay(LR, 30),
    ),
    "CosineAnnealingLR-eta_min": (
        lambda o: S.CosineAnnealingLR(o, T_max=25, eta_min=0.01),
        schedules.cosine_decay(LR, 25, alpha=0.01 / LR),
    ),
    "StepLR": (
        lambda o: S.StepLR(o, step_size=7, gamma=0.5),
        schedules.exponential_decay(LR, 7, 0.5, staircase=True),
    ),
    "MultiStepLR": (
        lambda o: S.MultiStepLR(o, milestones=[5, 12, 20], gamma=0.3),
        schedules.piecewise_constant(LR, {5: 0.3, 12: 0.3, 20: 0.3}),
    ),
    "ExponentialLR": (
        lambda o: S.ExponentialLR(o, gamma=0.9),
        schedules.exponential_decay(LR, 1, 0.9),
    ),
    "OneCycleLR": (
        lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=40),
        schedules.one_cycle(40, 1.0),
    ),
    "OneCycleLR-args": (
        lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=33, pct_start=0.45, div_factor=10.0, final_div_factor=100.0),
        schedules.one_cycle(33, 0.5, pct_start=0.45, div_factor=10.0, final_div_factor=100.0),
    ),
    "SequentialLR-warmup-cosine": (
        lambda o: S.SequentialLR(
            o,
            [S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=5), S.CosineAnnealingLR(o, T_max=25)],
            milestones=[5],
        ),
        schedules.warmup_cosine_decay(LR * 0.1, LR, warmup_steps=5, decay_steps=30),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_torch_lr_scheduler(name):
    make, schedule = CASES[name]
    # torch's cosine restarts after T_max (ours stays flat) and OneCycleLR refuses to run past its end.
    steps = {"CosineAnnealingLR-eta_min": 26, "OneCycleLR": 40, "OneCycleLR-args": 33}.get(name, 30)
    assert_lrs_equal(ours(schedule, steps), torch_lrs(make, steps), scale=1.0)


def test_one_cycle_flat_after_the_end_and_join_restarts_counts():
    s = schedules.one_cycle(10, 1.0)
    assert float(s(torch.tensor(9))) == float(s(torch.tensor(50))) == pytest.approx(1.0 / 25 / 1e4)
    joined = schedules.join([schedules.constant(2.0), schedules.linear(1.0, 0.0, 4), schedules.constant(-1.0)], [3, 7])
    assert ours(joined, 9) == [2.0, 2.0, 2.0, 1.0, 0.75, 0.5, 0.25, -1.0, -1.0]


def test_schedules_are_float64_tensors_and_accept_ints():
    for s in [schedules.constant(0.1), schedules.warmup_cosine_decay(0.0, 1.0, 2, 10), schedules.one_cycle(10, 1.0)]:
        out = s(torch.tensor(3))
        assert isinstance(out, torch.Tensor) and out.shape == () and out.dtype == torch.float64
        assert float(s(3)) == float(out)


def test_exponential_decay_begin_and_end_value():
    s = schedules.exponential_decay(1.0, 2, 0.5, transition_begin=4, end_value=0.3)
    assert ours(s, 9) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5**0.5, 0.5, 0.5**1.5, 0.3]


def test_schedules_trace_to_one_graph():
    # Schedules run inside the optimizer's compiled step (tests/test_optim.py counts its compiles
    # with inductor); here dynamo alone checks that each traces without a break or a recompile.
    from torch._dynamo.testing import CompileCounter

    all_schedules = [
        schedules.warmup_cosine_decay(0.0, 1.0, 3, 20),
        schedules.one_cycle(20, 1.0),
        schedules.piecewise_constant(1.0, {3: 0.1}),
        schedules.exponential_decay(1.0, 3, 0.5, staircase=True, end_value=0.1),
        schedules.join([schedules.constant(1.0), schedules.linear(1.0, 0.0, 4)], [5]),
    ]

    def evaluate(count):
        return torch.stack([s(count) for s in all_schedules])

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(evaluate, fullgraph=True, backend=counter)
    for t in range(25):
        assert torch.equal(compiled(torch.tensor(t)), evaluate(torch.tensor(t)))
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: schedules.linear(1.0, 0.0, 0), "linear: transition_steps must be an int >= 1, got 0"),
        (lambda: schedules.cosine_decay(1.0, 10.5), "decay_steps must be an int >= 1, got 10.5"),
        (lambda: schedules.warmup_cosine_decay(0.0, 1.0, 10, 10), r"decay_steps \(10\) is the total length"),
        (lambda: schedules.join([schedules.constant(1.0)], [3]), "one boundary between each pair"),
        (lambda: schedules.one_cycle(10, 1.0, pct_start=1.5), r"pct_start must be in \(0, 1\)"),
        (lambda: schedules.exponential_decay(1.0, 1, -0.5), "decay_rate must be > 0"),
    ],
)
def test_bad_arguments_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=30, deadline=None)
@given(
    init=st.floats(0.0, 1.0),
    peak=st.floats(0.01, 1.0),
    warmup=st.integers(0, 20),
    extra=st.integers(1, 50),
    t=st.integers(0, 200),
)
def test_warmup_cosine_stays_between_its_ends(init, peak, warmup, extra, t):
    s = schedules.warmup_cosine_decay(init, peak, warmup, warmup + extra, end_value=0.0)
    value = float(s(torch.tensor(t)))
    assert -1e-12 <= value <= max(init, peak) + 1e-12
    if t >= warmup + extra:
        assert value == pytest.approx(0.0, abs=1e-12)


def test_schedule_type_is_the_optimizers_one():
    # One definition: a function annotated with schedules.Schedule is what optim's learning_rate takes.
    assert schedules.Schedule is optim.Schedule
