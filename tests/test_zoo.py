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
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd

pytest.importorskip("transformers")

import zoo_models  # noqa: E402

import ftrain  # noqa: E402
from ftrain import optim, tree  # noqa: E402
from ftrain._step._dynamo import Settings  # noqa: E402

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


def graphs(step: ftrain.TrainStep | ftrain.EvalStep) -> int:
    """The graphs a step has run in this process: compiled here, or loaded from the step cache."""
    return step.num_compiles + step.num_loads


_KEYS = """
import ftrain, zoo_models
from ftrain._step._cache import step_key_of
for model in zoo_models.TRANSFORMERS:
    step = ftrain.make_train_step(model.loss_fn)
    state = ftrain.TrainState.create(model.build(0), ftrain.optim.adamw(1e-3))
    print(model.name, step_key_of(step.core, (state, model.batches(1)[0]), {}))
"""


def test_every_models_cache_key_is_the_same_in_another_process():
    # Python salts str hashes per process, and transformers' GenerationConfig keeps one: a key that
    # read it would differ in every run, and GPT-2, Llama and T5 would never start warm.
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    runs = [
        subprocess.run([sys.executable, "-c", _KEYS], env={**env, "PYTHONHASHSEED": seed}, capture_output=True,
                       text=True, timeout=300)
        for seed in ("1", "2")
    ]  # fmt: skip
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    keys = [dict(line.split() for line in run.stdout.splitlines()) for run in runs]
    assert sorted(keys[0]) == sorted(m.name for m in zoo_models.TRANSFORMERS)
    assert keys[0] == keys[1]


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
    assert graphs(trained.train_step) == 1


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
    assert graphs(trained.eval_step) == 1


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
    # T5's forward deep-copies its config, and dynamo guards on that object's identity: a new T5 module
    # object compiles once more (transformers' and dynamo's doing, not a state's) -- unless the step is
    # served by ftrain's cache, whose key (not object identity) decides what the saved graph serves.
    expected_graphs = 2 if trained.model.name == "t5" and not trained.train_step.cache else 1
    assert graphs(trained.train_step) == expected_graphs, "a restored state (another module object) recompiled"


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


# ---------------------------------------------------------------------------------------------
# What users' own models do: frozen parts, activation checkpointing, custom autograd, Python the
# compiler cannot trace, odd outputs. Small models, compiled with aot_eager (cheap) where compiled.


class Classifier(nn.Module):
    """An encoder and a head, as in fine-tuning: freeze the encoder, train the head."""

    def __init__(self, checkpointed: bool = False, custom: bool = False, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 3)
        self.checkpointed, self.custom = checkpointed, custom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.encoder, x, use_reentrant=False)
        else:
            h = self.encoder(x)
        return self.head(TripleGrad.apply(h) if self.custom else h)


class TripleGrad(torch.autograd.Function):
    """The identity forward, a backward that triples the gradient: not autograd of the forward,
    so a step that differentiated the forward instead of calling this backward is caught."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 3 * grad


def classifier_loss(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return nn.functional.cross_entropy(logits, y), {}, buffers


def classifier_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def matmuls_counted() -> tuple[Any, list[int]]:
    """An aot_eager backend that records how many matmuls each compiled graph holds."""
    counts: list[int] = []

    def fw(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        counts.append(sum(n.op == "call_function" and "mm" in str(n.target) for n in gm.graph.nodes))
        return gm.forward

    return aot_autograd(fw_compiler=fw), counts


def test_frozen_params_are_not_differentiated_not_updated_and_still_saved(tmp_path):
    def make(frozen: bool) -> ftrain.TrainState:
        torch.manual_seed(0)
        model = Classifier()
        if frozen:
            model.encoder.requires_grad_(False)
        return ftrain.TrainState.create(model, optim.adamw(1e-2))

    graphs = {}
    for frozen in (False, True):
        backend, counts = matmuls_counted()
        step, state = ftrain.make_train_step(classifier_loss, backend=backend), make(frozen)
        for batch in classifier_batches(5):
            state, _ = step(state, batch)
        graphs[frozen] = counts
    # Forward: 2 matmuls. Backward: the head's weight gradient, plus, when the encoder trains,
    # the gradient into the encoder and the encoder's weight gradient.
    assert graphs == {False: [5], True: [3]}, "a frozen parameter's gradient was computed"

    initial = make(True)
    assert sorted(initial.opt_state[0].mu) == ["head.bias", "head.weight"]  # no moments for frozen leaves
    grads = ftrain.loss_and_grad(
        classifier_loss, initial.apply_fn, initial.params, initial.buffers, classifier_batches(1)[0], initial.key
    )[0]
    assert sorted(grads) == ["head.bias", "head.weight"]
    eager = ftrain.make_train_step(classifier_loss, compile=False)
    state = initial
    for batch in classifier_batches(5):
        state, _ = eager(state, batch)
    for name in ("encoder.0.weight", "encoder.0.bias"):
        assert torch.equal(state.params[name], initial.params[name]), f"frozen {name} changed"
    assert not torch.equal(state.params["head.weight"], initial.params["head.weight"])
    with ftrain.CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        manager.save(state)
        restored, _ = manager.restore_latest(make(True))
    assert tree.equal(tree.leaves(restored), tree.leaves(state))
    module = restored.to_module()
    assert not module.encoder[0].weight.requires_grad and module.head.weight.requires_grad


def test_a_state_with_every_parameter_frozen_is_refused():
    model = Classifier().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        ftrain.TrainState.create(model, optim.adamw(1e-3))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["checkpointed", "custom"])
def test_activation_checkpointing_and_custom_functions_give_eager_autograds_gradients(kind, compile):
    x, y = batch = classifier_batches(1)[0]
    torch.manual_seed(0)
    reference = Classifier(**{kind: True})
    module = Classifier(**{kind: True})
    module.load_state_dict(reference.state_dict())
    state = ftrain.TrainState.create(module, optim.sgd(1.0))  # (so the update is minus the gradient)
    nn.functional.cross_entropy(reference(x), y).backward()
    new_state, _ = ftrain.make_train_step(classifier_loss, compile=compile, backend="aot_eager")(state, batch)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name] - new_state.params[name], p.grad, msg=name)
    if kind == "custom":  # the reference really ran the tripled backward: a dropped one would differ
        plain = Classifier()
        plain.load_state_dict(reference.state_dict())
        nn.functional.cross_entropy(plain(x), y).backward()
        torch.testing.assert_close(reference.encoder[0].weight.grad, 3 * plain.encoder[0].weight.grad)


LOG = logging.getLogger("tests.chatty")


class Chatty(nn.Module):
    """Logs and warns in its forward, as library models do (transformers' logger.warning_once)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        LOG.warning("forward on a batch of %d", x.shape[0])
        warnings.warn("Chatty is deprecated", FutureWarning, stacklevel=2)
        return self.linear(x)


def test_logging_and_warnings_in_the_model_run_once_and_do_not_break_the_compiled_step(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(tmp_path))  # (a fresh cache: the step traces the model here)
    config = torch._dynamo.config
    before = (set(config.ignore_logging_functions), config.trace_autograd_ops)
    state = ftrain.TrainState.create(Chatty(), optim.sgd(0.1))
    step = ftrain.make_train_step(classifier_loss, backend="aot_eager")
    with pytest.warns(FutureWarning, match="deprecated") as seen, caplog.at_level(logging.WARNING, "tests.chatty"):
        for batch in classifier_batches(3):
            state, _ = step(state, batch)
    assert step.num_compiles == 1
    # Once, from the check on fake tensors before compiling; the compiled graph skips them.
    assert len([w for w in seen if "Chatty" in str(w.message)]) == 1 and len(caplog.records) == 1
    assert (set(config.ignore_logging_functions), config.trace_autograd_ops) == before, "dynamo settings leaked"


def test_steady_compiled_calls_skip_the_dynamo_settings_and_a_recompile_runs_under_them(monkeypatch, tmp_path):
    # The settings cost ~13 us a call; only the cache's slow path can trace, so only it needs them.
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(tmp_path))  # (a fresh cache: every new shape compiles here)
    entered = []
    enter = Settings.__enter__
    monkeypatch.setattr(Settings, "__enter__", lambda self: entered.append(1) or enter(self))
    state = ftrain.TrainState.create(Chatty(), optim.sgd(0.1))
    step = ftrain.make_train_step(classifier_loss, backend="aot_eager", new_shapes="recompile")
    batches = classifier_batches(4)
    with pytest.warns(FutureWarning, match="deprecated"):
        state, _ = step(state, batches[0])
    compiling = len(entered)
    for batch in batches[1:]:
        state, _ = step(state, batch)
    assert compiling > 0 and len(entered) == compiling, "steady calls entered the dynamo settings"
    # A new batch size recompiles (dynamic): under the settings, so the logging model still traces whole.
    x, y = batches[0]
    with pytest.warns(FutureWarning, match="deprecated"):  # (the fake-tensor check of the new shape runs it)
        state, _ = step(state, (torch.cat([x, x[:2]]), torch.cat([y, y[:2]])))
    assert step.num_compiles == 2 and len(entered) > compiling


class Untraceable(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.linear, self.how = nn.Linear(8, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.how == "branch" and out.abs().sum() > 0:  # a Python branch on a tensor's value (always taken)
            out = out * 2
        if self.how == "break":
            torch._dynamo.graph_break()  # (what an untraceable library call does to the compiler)
        return out


@pytest.mark.parametrize("how", ["branch", "break"])
def test_untraceable_python_is_a_short_step_error_naming_the_construct_and_the_line(how):
    state = ftrain.TrainState.create(Untraceable(how), optim.sgd(0.1))
    step = ftrain.make_train_step(classifier_loss, backend="aot_eager")
    with pytest.raises(ftrain.StepError) as info:
        step(state, classifier_batches(1)[0])
    message = str(info.value)
    assert "fullgraph=False" in message and "test_zoo.py" in message and "in forward" in message
    assert ("tensor's value" if how == "branch" else "graph_break") in message
    assert len(message.splitlines()) <= 6


@pytest.mark.parametrize("how", ["branch", "break"])
def test_fullgraph_false_allows_graph_breaks_warns_once_and_is_correct_without_recompiling(how):
    batches = classifier_batches(6)
    eager = ftrain.make_train_step(classifier_loss, compile=False)
    step = ftrain.make_train_step(classifier_loss, fullgraph=False, backend="aot_eager")
    state = expected = ftrain.TrainState.create(Untraceable(how), optim.sgd(0.1))
    with pytest.warns(UserWarning, match=r"graph break.*test_zoo\.py:\d+") as seen:
        state, _ = step(state, batches[0])
    assert len(seen) == 1
    compiles = step.num_compiles
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no second warning)
        for batch in batches[1:]:
            state, _ = step(state, batch)
    assert step.num_compiles == compiles, "a graph-broken step recompiled"
    for batch in batches:
        expected, _ = eager(expected, batch)
    assert tree.allclose(tree.leaves(state), tree.leaves(expected), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: what a model or loss_fn may hand back.


class Out:
    """Neither a tensor nor a dataclass nor a pytree: a plain object holding the logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> Out:
        return Out(self.linear(x))


def test_a_model_returning_a_plain_object_trains_and_predicts_compiled():
    def loss_fn(apply, params, buffers, batch, key):
        out, buffers = apply(params, buffers, batch[0])
        return nn.functional.cross_entropy(out.logits, batch[1]), {}, buffers

    batches = classifier_batches(3)
    compiled, eager = (
        ftrain.make_train_step(loss_fn, backend="aot_eager"),
        ftrain.make_train_step(loss_fn, compile=False),
    )
    state = expected = ftrain.TrainState.create(Wrapped(), optim.sgd(0.1))
    for batch in batches:
        state, _ = compiled(state, batch)
        expected, _ = eager(expected, batch)
    assert tree.allclose(tree.leaves(state), tree.leaves(expected), rtol=1e-5, atol=1e-6)
    predicted = ftrain.make_predict_step(backend="aot_eager")(state, batches[0])  # the object itself comes back
    assert isinstance(predicted, Out)
    torch.testing.assert_close(predicted.logits, state.to_module()(batches[0][0]).logits)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_loss_that_is_a_python_float_is_a_clear_error(compile):
    def loss_fn(apply, params, buffers, batch, key):
        out, _ = apply(params, buffers, batch[0])
        return out.square().mean().item()

    state = ftrain.TrainState.create(nn.Linear(8, 3), optim.sgd(0.1))
    step = ftrain.make_train_step(loss_fn, compile=compile, backend="aot_eager")
    # Eager, the float itself is refused; compiled, the .item() that made it (checked before compiling).
    with pytest.raises(
        ftrain.StepError, match="tensor's value.*\n.* in loss_fn" if compile else "returned a Python float"
    ):
        step(state, classifier_batches(1)[0])


class Counting(nn.Module):
    """Counts its forward calls in a buffer, in place."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_buffer_the_forward_mutates_in_place_comes_out_as_a_new_buffer(compile):
    state = ftrain.TrainState.create(Counting(), optim.sgd(0.1))
    step = ftrain.make_train_step(classifier_loss, compile=compile, backend="aot_eager")
    first = state
    for batch in classifier_batches(4):
        state, _ = step(state, batch)
    assert int(state.buffers["calls"]) == 4
    assert int(first.buffers["calls"]) == 0, "the step wrote into its input state"


class GroupedAttention(nn.Module):
    """Llama's attention call: 4 query heads share 2 k/v heads (``enable_gqa=True``), with dropout."""

    def __init__(self):
        super().__init__()
        self.attention_dropout = 0.3

    def forward(self, q, k, v, grouped: bool = True):
        if not grouped:  # the same attention with the k/v heads repeated by hand
            k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        p = self.attention_dropout if self.training else 0.0
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=grouped)


def test_keyed_attention_dropout_handles_grouped_query_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 5, 8, generator=g) for heads in (4, 2, 2))
    apply, key = ftrain.ModuleApply(GroupedAttention()), ftrain.random.key(3)
    grouped = apply({}, {}, q, k, v, key=key)[0]
    torch.testing.assert_close(grouped, apply({}, {}, q, k, v, grouped=False, key=key)[0], rtol=0, atol=0)
    assert not torch.equal(grouped, apply({}, {}, q, k, v, key=ftrain.random.key(4))[0])  # (keyed masks)
    # And a Llama with attention dropout trains (it raised NotImplementedError before).
    state = fresh_state(zoo_models.LLAMA, dropout=0.1)
    _, metrics = ftrain.make_train_step(zoo_models.LLAMA.loss_fn, compile=False)(state, zoo_models.LLAMA.batches(1)[0])
    assert torch.isfinite(metrics["loss"])


def test_eager_activation_checkpointing_refuses_dropout_in_a_segment():
    # torch's recompute in the backward would draw other masks: wrong gradients, so it is refused.
    state = ftrain.TrainState.create(zoo_models.GPT2.build(0, dropout=0.1), optim.sgd(0.1))
    state.apply_fn.module.activation_checkpointing_enable({"use_reentrant": False})
    step = ftrain.make_train_step(zoo_models.GPT2.loss_fn, compile=False)
    with pytest.raises(RuntimeError, match="activation-checkpointed segment is not supported"):
        step(state, zoo_models.GPT2.batches(1)[0])


def test_dropout_inside_a_checkpointed_segment_is_refused_compiled_too():
    state = ftrain.TrainState.create(Classifier(checkpointed=True, dropout=0.5), optim.sgd(0.1))
    step = ftrain.make_train_step(classifier_loss, backend="aot_eager")
    with pytest.raises(ftrain.StepError, match="activation-checkpointed segment is not supported"):
        step(state, classifier_batches(1)[0])
