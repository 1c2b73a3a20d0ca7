"""On-device metric accumulation: equals a plain Python reference, and syncs only in compute()."""

import math

import pytest
import torch

from ftrain import metrics


class SyncCounter(torch.Tensor):
    """A tensor subclass that counts device-to-host reads (.item(), float(), .tolist(), bool())."""

    syncs = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__):
            SyncCounter.syncs += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def counted(x: float) -> torch.Tensor:
    return torch.tensor(x).as_subclass(SyncCounter)


def reference(values, how, weights):
    if how == "mean":
        return sum(v * w for v, w in zip(values, weights)) / sum(weights)
    return {"sum": sum, "last": lambda v: v[-1], "max": max, "min": min}[how](values)


@pytest.mark.parametrize("how", metrics.REDUCTIONS)
def test_reductions_match_python_reference(how):
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(37, generator=g) * 10).tolist()
    weights = torch.randint(1, 64, (37,), generator=g).tolist()
    acc = metrics.Accumulator({"m": how})
    for v, w in zip(values, weights):
        acc.update({"m": torch.tensor(v, dtype=torch.float32)}, weight=w)
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in values]
    assert acc.compute()["m"] == pytest.approx(reference(f32, how, weights if how == "mean" else [1] * 37), rel=1e-9)
    assert len(acc) == 37


def test_default_reduction_and_mixed_names_and_reset():
    acc = metrics.Accumulator({"lr": "last", "seen": "sum"}, default="max")
    acc.update({"loss": torch.tensor(1.0), "lr": torch.tensor(0.1), "seen": torch.tensor(8)})
    acc.update({"loss": torch.tensor(3.0), "lr": torch.tensor(0.2), "seen": torch.tensor(8)})
    assert acc.compute() == pytest.approx({"loss": 3.0, "lr": 0.2, "seen": 16.0})
    assert acc.names == ["loss", "lr", "seen"]
    acc.reset()
    assert acc.compute() == {} and len(acc) == 0


def test_update_never_syncs_and_compute_syncs_once():
    acc = metrics.Accumulator({"lr": "last", "top": "max"})
    SyncCounter.syncs = 0
    for i in range(100):
        acc.update({"loss": counted(float(i)), "lr": counted(0.1), "top": counted(float(-i))}, weight=2)
    assert SyncCounter.syncs == 0
    out = acc.compute()
    assert SyncCounter.syncs == 1
    assert out == pytest.approx({"loss": 49.5, "lr": 0.1, "top": 0.0})


def test_python_numbers_are_accepted_and_the_sum_is_float64_on_cpu():
    acc = metrics.Accumulator({"n": "sum"})
    for _ in range(10):
        acc.update({"n": 0.1})
    assert acc.compute()["n"] == pytest.approx(1.0, abs=1e-15)


def test_accuracy_matches_counting():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 7, generator=g)
    labels = torch.randint(0, 7, (200,), generator=g)
    expected = sum(int(row.argmax()) == int(y) for row, y in zip(logits, labels)) / 200
    assert float(metrics.accuracy(logits, labels)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one-hot"):
        metrics.accuracy(logits, torch.nn.functional.one_hot(labels, 7))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"unknown reduction 'median' for 'loss'"):
        metrics.Accumulator({"loss": "median"})
    acc = metrics.Accumulator()
    with pytest.raises(ValueError, match=r"metric 'logits' must be a scalar, got a tensor of shape \(4, 2\)"):
        acc.update({"logits": torch.zeros(4, 2)})
    with pytest.raises(TypeError, match=r"metric 'name' must be a 0-d tensor or a number, got str"):
        acc.update({"name": "x"})


def test_nan_propagates_so_non_finite_losses_are_visible():
    acc = metrics.Accumulator()
    acc.update({"loss": torch.tensor(1.0)})
    acc.update({"loss": torch.tensor(float("nan"))})
    assert math.isnan(acc.compute()["loss"])
