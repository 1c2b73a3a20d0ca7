"""ftrain.summary and the Summarize action: params per module, FLOPs against hand counts (#16)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import ftrain
from ftrain import actions, optim


def digits_loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return nn.functional.cross_entropy(logits, y), {}, buffers


def digits_state(tx=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return ftrain.TrainState.create(net, tx or optim.adamw(3e-3, weight_decay=1e-4))


def digits_batch(b: int = 32):
    return torch.randn(b, 64), torch.randint(0, 10, (b,))


def test_digits_mlp_flops_equal_the_hand_count():
    b = 32
    s = ftrain.summary(digits_state(), digits_batch(b), digits_loss_fn)
    forward = 2 * b * (64 * 128 + 128 * 10)  # a matmul of (m,k)@(k,n) is 2mkn FLOPs
    # backward: each weight's gradient costs its forward again, and each layer's input gradient
    # too, except the first layer's (the batch needs no gradient): 3x forward minus that one
    backward = forward + 2 * b * 128 * 10
    assert s.flops == forward + backward
    assert not s.flops_are_forward_only
    assert [(m.name, m.type, m.params, m.flops) for m in s.modules] == [
        ("0", "Linear", 64 * 128 + 128, 2 * 2 * b * 64 * 128),
        ("2", "Linear", 128 * 10 + 10, 3 * 2 * b * 128 * 10),
    ]
    assert s.params == s.trainable == 64 * 128 + 128 + 128 * 10 + 10 and s.param_bytes == 4 * s.params
    assert ftrain.summary(digits_state(), digits_batch(b)).flops == forward  # no loss_fn: the forward alone


def test_transformers_gpt2_flops_are_three_times_the_hand_counted_forward():
    transformers = pytest.importorskip("transformers")
    d, layers, vocab, b, t = 32, 2, 64, 2, 16
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=t, n_embd=d, n_layer=layers, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    state = ftrain.TrainState.create(transformers.GPT2LMHeadModel(config), optim.adamw(1e-3))

    def loss_fn(apply, params, buffers, batch, key):
        out, buffers = apply(params, buffers, input_ids=batch, labels=batch)
        return out.loss

    batch = torch.randint(0, vocab, (b, t))
    s = ftrain.summary(state, batch, loss_fn)
    tokens = b * t
    per_layer = 2 * tokens * (d * 3 * d + d * d + 2 * d * 4 * d)  # qkv, out proj, MLP up and down
    per_layer += 2 * 2 * b * t * t * d  # attention: q @ k^T and p @ v
    forward = layers * per_layer + 2 * tokens * d * vocab  # the (tied) LM head
    assert s.flops == 3 * forward  # the input embeddings carry gradients, so every matmul counts 3x
    assert s.params == sum(p.numel() for p in state.params.values())


def test_frozen_groups_and_nothing_runs_for_real():
    tx = optim.partition({"body": optim.set_to_zero(), "head": optim.adam(1e-3)}, {
        "0.weight": "body", "0.bias": "body", "2.weight": "head", "2.bias": "head"
    })  # fmt: skip
    seen = []

    def loss_fn(apply, params, buffers, batch, key):
        seen.append(type(batch[0]))
        return digits_loss_fn(apply, params, buffers, batch, key)

    state = digits_state(tx)
    before = ftrain.tree.map(torch.clone, state.params)
    s = ftrain.summary(state, digits_batch(), loss_fn)
    assert seen == [FakeTensor]  # one run, on fake tensors
    assert ftrain.tree.allclose(state.params, before)
    assert [(m.name, m.trainable) for m in s.modules] == [("0", 0), ("2", 128 * 10 + 10)]
    assert s.frozen == 64 * 128 + 128
    table = str(s)
    assert "frozen 8,320" in table and "FLOPs per train step" in table
    assert s.as_dict()["frozen_params"] == 8320


def test_summarize_action_prints_the_table_and_writes_it_at_fits_start(tmp_path, capsys):
    sink = ftrain.writers.JSONL(tmp_path / "m.jsonl")
    step = ftrain.make_train_step(digits_loss_fn, compile=False)
    summarize = actions.Summarize(digits_batch(), digits_loss_fn)
    ftrain.fit(digits_state(), step, [digits_batch()] * 2, num_steps=2, log=sink, progress=False, actions=[summarize])
    assert "module  type" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "summary/flops_per_step" in r)
    assert first["summary/flops_per_step"] == summarize.summary.flops and first["summary/params"] == 9610


def test_throughput_rates_tflops_and_mfu_from_the_loops_clock():
    summarize = actions.Summarize(digits_batch(32), digits_loss_fn, print_table=False)
    meter = actions.Throughput(32, tokens_per_sample=64, flops_per_step=summarize, peak_flops=2e9, every=4)
    run = ftrain.actions.Run(state=digits_state())
    summarize.start(run)
    meter.start(run)
    for s in range(1, 9):  # a step every 0.25 s: 4 steps/s once the first step is behind
        run.step, run.time = s, run.time + 0.25
        meter(run)
    flops = summarize.summary.flops
    assert run.new["train/samples_per_sec"] == pytest.approx(4 * 32)
    assert run.new["train/tokens_per_sec"] == pytest.approx(4 * 32 * 64)
    assert run.new["train/tflops"] == pytest.approx(4 * flops / 1e12)
    assert run.new["train/mfu"] == pytest.approx(4 * flops / 2e9)
    assert "train/memory_gib" not in run.new  # the CPU reports no peak memory


def test_peak_flops_knows_gpus_by_name_and_measures_a_cpu(monkeypatch):
    from ftrain._summary import peak_flops

    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda")) == peak
    assert 1e7 < peak_flops("cpu", size=128, repeats=2) < 1e14


def test_fit_publishes_throughput_with_the_summarys_flops(tmp_path):
    sink = ftrain.writers.JSONL(tmp_path / "m.jsonl")
    summarize = actions.Summarize(digits_batch(), digits_loss_fn, print_table=False)
    meter = actions.Throughput(32, flops_per_step=summarize, every=2)
    step = ftrain.make_train_step(digits_loss_fn, compile=False)
    ftrain.fit(digits_state(), step, [digits_batch()] * 5, num_steps=5, log=sink, progress=False,
               actions=[summarize, meter])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    rates = [r for r in rows if "train/mfu" in r]
    assert [r["step"] for r in rates] == [2, 4] and all(0 < r["train/mfu"] < 1 for r in rates)
    assert all(r["train/samples_per_sec"] > 0 and r["train/tflops"] > 0 for r in rates)
