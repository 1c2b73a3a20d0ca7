"""Writers beyond scalars: images, histograms and text to TensorBoard; the Histograms action (#16)."""

from __future__ import annotations

import io

import pytest
import torch

import ftrain
from ftrain import actions, writers


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_param_histograms_count_on_the_device_and_match_numpy_style_counts():
    w = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 1.0])
    h = actions.param_histograms({"w": w}, bins=2)["params/w"]
    assert (h.min, h.max, h.num) == (0.0, 1.0, 6)
    assert h.counts == [2.0, 4.0] and h.edges == [0.0, 0.5, 1.0]  # [0, .5), [.5, 1] (the max in the last bin)
    assert h.sum == pytest.approx(3.5) and h.sum_squares == pytest.approx(float((w**2).sum()))
    assert actions.param_histograms({"n": torch.arange(3)}) == {}  # integer tensors are not params to plot


def test_tensorboard_writes_images_histograms_and_text_and_others_skip_them(tmp_path):
    pytest.importorskip("tensorboard")
    tb = writers.TensorBoard(tmp_path)
    console = io.StringIO()
    both = writers.MultiWriter([tb, writers.Console(console)])
    both.write_images(3, {"samples": torch.rand(2, 1, 8, 8), "one": torch.rand(3, 4, 4)})
    both.write_histograms(3, {"raw": torch.randn(100), **actions.param_histograms({"w": torch.randn(50)})})
    both.write_text(3, {"notes": "hello"})
    tb.close()
    events = read_events(tmp_path)
    assert sorted(events.Tags()["histograms"]) == ["params/w", "raw"]
    assert events.Histograms("params/w")[0].histogram_value.num == 50
    assert sorted(events.Tags()["images"]) == ["one", "samples"]
    assert "notes/text_summary" in events.Tags()["tensors"]
    assert console.getvalue() == ""  # the console has no images to show: skipped, not an error


def test_histograms_action_writes_every_n_steps_with_one_sync(tmp_path):
    class Collect:
        def __init__(self):
            self.histograms = []

        def write_scalars(self, step, scalars): ...
        def write_hparams(self, hparams): ...
        def flush(self): ...
        def close(self): ...
        def write_histograms(self, step, histograms):
            self.histograms.append((step, sorted(histograms)))

    sink = Collect()
    state = ftrain.TrainState.create(torch.nn.Linear(3, 2), ftrain.optim.sgd(0.1))

    def loss_fn(apply, params, buffers, batch, key):
        return apply(params, buffers, batch)[0].square().mean()

    step = ftrain.make_train_step(loss_fn, compile=False)
    ftrain.fit(state, step, [torch.ones(4, 3)] * 4, num_steps=4, log=sink, progress=False,
               actions=[actions.Histograms(every=2, bins=8)])  # fmt: skip
    assert sink.histograms == [(2, ["params/bias", "params/weight"]), (4, ["params/bias", "params/weight"])]


def test_histograms_action_writes_the_gradient_of_its_probe_batch_recomputed_eagerly():
    class Collect(writers.MultiWriter):
        def __init__(self):
            super().__init__([])
            self.seen = {}

        def write_histograms(self, step, histograms):
            self.seen[step] = histograms

    def loss_fn(apply, params, buffers, batch, key):
        x, y = batch
        return torch.nn.functional.mse_loss(apply(params, buffers, x)[0], y)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    probe = (torch.randn(16, 3), torch.randn(16, 2))
    state = ftrain.TrainState.create(model, ftrain.optim.sgd(0.1))
    data = [(torch.randn(4, 3), torch.randn(4, 2))] * 3
    sink = Collect()
    state = ftrain.fit(state, ftrain.make_train_step(loss_fn, compile=False), data, num_steps=3, log=sink,
                       progress=False, actions=[actions.Histograms(every=3, bins=4, loss_fn=loss_fn, batch=probe)])  # fmt: skip

    # By hand: the gradient of the probe batch's loss at the params after step 3 (not of a train batch).
    w = state.params["weight"].clone().requires_grad_()
    b = state.params["bias"].clone().requires_grad_()
    torch.nn.functional.mse_loss(probe[0] @ w.T + b, probe[1]).backward()
    assert sorted(sink.seen) == [3]
    h = sink.seen[3]
    assert sorted(h) == ["grads/bias", "grads/weight", "params/bias", "params/weight"]
    for name, grad in (("weight", w.grad), ("bias", b.grad)):
        assert (h[f"grads/{name}"].min, h[f"grads/{name}"].max) == pytest.approx((grad.min(), grad.max()))
        assert h[f"grads/{name}"].sum == pytest.approx(float(grad.sum())) and h[f"grads/{name}"].num == grad.numel()
    with pytest.raises(ValueError, match="need both loss_fn= and batch="):
        actions.Histograms(loss_fn=loss_fn)
