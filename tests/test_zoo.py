"""Models nobody here wrote: tiny random-init Hugging Face ``transformers`` models, trained compiled.

Per model (GPT-2 with its tied LM head, BERT for sequence classification, ViT, ResNet with
BatchNorm, Llama with RoPE/RMSNorm/SDPA, T5 as the encoder-decoder): one compiled train step and
one compiled eval step, shared by that model's tests (module-scoped fixture). The train step runs
20 steps and must compile once; its losses must equal a plain PyTorch loop (``torch.optim.AdamW``,
``loss.backward()``) on the same batches; the eval step, a checkpoint round trip and
``state.to_module()`` must agree with the trained state. Dropout is off for the comparison (torch's
global-RNG masks cannot match ftrain's keyed ones); the GPT-2 dropout test runs it on.

Compile time is this file's cost: 12 distinct compiled functions. They use the ``aot_eager``
backend by default: dynamo and AOTAutograd trace the whole step as inductor would get it (one graph,
the same recompile guards, the same autograd), without inductor's code generation, which is most of
the compile time (ResNet: 24 s against several minutes on 2 busy cores).
``FTRAIN_ZOO_BACKEND=inductor`` runs the real thing; benchmarks/real_models.py times it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import zoo_models  # noqa: E402

import ftrain  # noqa: E402
from ftrain import optim, tree  # noqa: E402

STEPS, LR = 20, 1e-3
BACKEND = os.environ.get("FTRAIN_ZOO_BACKEND", "aot_eager")


@dataclasses.dataclass
class Trained:
    """One model's shared compiled steps and the state they trained (20 steps from seed 0)."""

    model: zoo_models.ZooModel
    train_step: ftrain.TrainStep
    eval_step: ftrain.EvalStep
    batches: list[dict[str, torch.Tensor]]
    state: ftrain.TrainState
    losses: list[float]


def fresh_state(model: zoo_models.ZooModel, seed: int = 0, **kw: Any) -> ftrain.TrainState:
    return ftrain.TrainState.create(model.build(seed, **kw), optim.adamw(LR))


@pytest.fixture(scope="module", params=zoo_models.TRANSFORMERS, ids=lambda m: m.name)
def trained(request) -> Trained:
    model = request.param
    train_step = ftrain.make_train_step(model.loss_fn, backend=BACKEND)
    eval_step = ftrain.make_eval_step(model.loss_fn, backend=BACKEND)
    state, batches, losses = fresh_state(model), model.batches(STEPS), []
    for batch in batches:
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return Trained(model, train_step, eval_step, batches, state, losses)


def plain_pytorch_losses(model: zoo_models.ZooModel, batches: list) -> list[float]:
    """The loop a PyTorch user writes: same init, same batches, torch.optim.AdamW (foreach)."""
    module = model.build(0)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=LR)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model.torch_loss(module, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_compiled_step_compiles_once_over_20_steps(trained):
    assert int(trained.state.step) == STEPS
    assert trained.train_step.num_compiles == 1


def test_losses_equal_a_plain_pytorch_loop(trained):
    expected = plain_pytorch_losses(trained.model, trained.batches)
    assert trained.losses == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_eval_step_equals_the_exported_module(trained):
    batch = trained.batches[0]
    metrics = trained.eval_step(trained.state, batch)
    module = trained.state.to_module().eval()
    with torch.no_grad():
        expected = trained.model.torch_loss(module, batch)
    torch.testing.assert_close(metrics["loss"], expected, rtol=1e-5, atol=1e-6)
    assert trained.eval_step.num_compiles == 1


def test_to_module_reproduces_the_pure_outputs(trained):
    model = trained.model

    def logits(apply, params, buffers, batch, key):
        return model.logits(apply(params, buffers, **batch)[0])

    batch = trained.batches[-1]
    pure = ftrain.make_predict_step(logits, compile=False)(trained.state, batch)
    with torch.no_grad():
        exported = model.logits(trained.state.to_module().eval()(**batch))
    torch.testing.assert_close(pure, exported, rtol=0, atol=0)


def test_checkpoint_round_trips_and_training_resumes_without_recompiling(trained, tmp_path):
    with ftrain.CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        assert manager.save(trained.state)
        template = fresh_state(trained.model, seed=1)
        restored, extras = manager.restore_latest(template)
    assert extras["step"] == STEPS
    assert tree.equal(tree.leaves(restored), tree.leaves(trained.state))
    batch = trained.batches[0]
    resumed, metrics = trained.train_step(restored, batch)
    expected, expected_metrics = trained.train_step(trained.state, batch)
    assert tree.equal(tree.leaves(resumed), tree.leaves(expected))
    assert trained.train_step.num_compiles == 1, "a restored state (another module object) must not recompile"


def test_gpt2_keeps_its_embeddings_tied_and_trains_with_keyed_dropout():
    model = zoo_models.GPT2
    state = fresh_state(model, dropout=0.1)
    assert "lm_head.weight" not in state.params  # tied to transformer.wte.weight: one leaf
    step = ftrain.make_train_step(model.loss_fn, compile=False)
    batches = model.batches(3)

    def run(state):
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        return state, losses

    trained_state, losses = run(state)
    assert run(state)[1] == losses  # the same key draws the same masks
    assert run(fresh_state(model))[1] != losses  # dropout does something
    module = trained_state.to_module()
    assert module.lm_head.weight is module.transformer.wte.weight
