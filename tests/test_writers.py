"""Writers: one protocol, each sink reads back what was written, rank 0 only, fan-out, and fit's use of them."""

import csv
import io
import json

import pytest
import torch
from torch import nn

import ftrain
from ftrain import writers


class Collect:
    def __init__(self):
        self.scalars, self.hparams, self.flushes, self.closed = [], [], 0, False

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def write_hparams(self, hparams):
        self.hparams.append(dict(hparams))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_console_line_format():
    out = io.StringIO()
    w = writers.Console(out)
    w.write_scalars(100, {"train/loss": 0.412345, "lr": 3e-4, "big": 123456.0, "bad": float("nan")})
    w.write_hparams({"model": {"width": 64}, "lr": 0.1})
    assert out.getvalue().splitlines() == [
        "step 100 | train/loss 0.4123 | lr 3.000e-04 | big 1.235e+05 | bad nan",
        "hparams: model.width=64, lr=0.1",
    ]


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    w = writers.JSONL(path)
    w.write_hparams({"lr": 0.1, "dtype": torch.bfloat16, "layers": [64, 64]})
    w.write_scalars(1, {"train/loss": 2.5})
    w.write_scalars(2, {"train/loss": 1.5, "val/acc": 0.75})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"hparams": {"lr": 0.1, "dtype": "torch.bfloat16", "layers": [64, 64]}},
        {"step": 1, "train/loss": 2.5},
        {"step": 2, "train/loss": 1.5, "val/acc": 0.75},
    ]


def test_csv_round_trip_header_written_once(tmp_path):
    path = tmp_path / "metrics.csv"
    writers.CSV(path).write_scalars(1, {"a": 0.1})
    w = writers.CSV(path)  # a second writer on the same file (a resumed run) appends, no second header
    w.write_scalars(2, {"a": 0.2, "b": 1 / 3})
    w.write_hparams({"seed": 0})
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "name", "value"], ["1", "a", "0.1"], ["2", "a", "0.2"], ["2", "b", repr(1 / 3)]]
    assert json.loads((tmp_path / "metrics.hparams.json").read_text()) == {"seed": 0}


def test_tensorboard_scalars_and_hparams_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = writers.TensorBoard(tmp_path)
    w.write_hparams({"lr": 0.1, "opt": {"name": "adam"}})
    for step in (10, 20):
        w.write_scalars(step, {"train/loss": 1.0 / step})
    w.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert "hparams" in "".join(events.Tags()["tensors"])  # the text summary
    plugin = events.PluginTagToContent("hparams")
    assert plugin, "the hparams summaries were not written to the run directory"


def test_multiwriter_fans_out_and_validates():
    a, b = Collect(), Collect()
    w = writers.MultiWriter([a, b])
    w.write_scalars(3, {"x": 1.0})
    w.write_hparams({"h": 1})
    w.flush()
    w.close()
    for c in (a, b):
        assert c.scalars == [(3, {"x": 1.0})] and c.hparams == [{"h": 1}] and c.flushes == 1 and c.closed
    with pytest.raises(TypeError, match=r"writer 1 is a object, which lacks \['write_scalars'"):
        writers.MultiWriter([a, object()])
    with pytest.raises(TypeError, match="log= expects a writer or a list of writers, got str"):
        writers.to_writer("runs/exp")


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    out = io.StringIO()
    sinks = [writers.Console(out), writers.JSONL(tmp_path / "m.jsonl"), writers.CSV(tmp_path / "m.csv")]
    tb = writers.TensorBoard(tmp_path / "tb")
    for w in [*sinks, tb]:
        w.write_hparams({"a": 1})
        w.write_scalars(1, {"x": 1.0})
        w.close()
    assert out.getvalue() == "" and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    writers.JSONL(tmp_path / "m.jsonl").write_scalars(1, {"x": 1.0})
    assert (tmp_path / "m.jsonl").exists()


def test_fit_writes_hparams_once_and_scalars_at_the_log_interval():
    state = ftrain.TrainState.create(nn.Linear(2, 1), ftrain.optim.sgd(0.1))

    def step(s, batch):
        return s.replace(step=s.step + 1), {"loss": batch.sum()}

    sink = Collect()
    data = [torch.full((2,), float(i)) for i in range(10)]
    ftrain.fit(state, step, data, num_steps=10, log=sink, log_every=4, hparams={"lr": 0.1}, progress=False)
    assert sink.hparams == [{"lr": 0.1}]
    assert [s for s, _ in sink.scalars] == [4, 8, 10]
    # the mean of the losses of steps 1..4, 5..8 and 9..10: batch i sums to 2 * i
    assert [v["train/loss"] for _, v in sink.scalars] == pytest.approx([3.0, 11.0, 17.0])
    assert all(v["train/steps_per_sec"] > 0 for _, v in sink.scalars)
    assert sink.flushes >= 1 and not sink.closed  # fit flushes, the caller closes
