"""The eager step's shortcuts change nothing: bitwise the plain module's forward, backward and buffers.

ftrain's eager (``compile=False``) step binds the state's tensors into the module's slots instead of
``functional_call``, differentiates fresh leaves with ``torch.autograd.grad``, clones the buffers,
computes the ``grad_norm`` metric with a host-side fast path, and runs under deterministic mode. Each
of these is there for speed or purity and none may show in the results: after several steps the
params, optimizer state, buffers and metrics must equal, bit for bit, a reference built the plain
PyTorch way (a real module from ``to_module``, ``loss.backward()``, ``get_total_norm``, default torch
settings), with the same optimizer update. And every state handed to the step is left untouched.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import zoo_models  # noqa: E402

import ftrain  # noqa: E402
from ftrain import optim, tree  # noqa: E402

STEPS = 4
MODELS = (zoo_models.DIGITS_MLP, zoo_models.BERT, zoo_models.RESNET)


def reference_step(model: zoo_models.ZooModel, state: ftrain.TrainState, batch: dict) -> tuple:
    """One step the plain way: a real module's forward and backward, then the same optimizer update."""
    module = state.to_module()
    module.train()
    loss = model.torch_loss(module, batch)
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    with torch.no_grad():
        new = state.apply_gradients(grads, buffers=buffers)
        grad_norm = torch.nn.utils.get_total_norm(tree.leaves(grads))  # (in ftrain's leaf order: sorted names)
    return new, {"loss": loss.detach(), "grad_norm": grad_norm}


def snapshot(state: ftrain.TrainState) -> list[tuple[torch.Tensor, int]]:
    """Copies of ``state``'s tensors with their version counters (an in-place write moves the counter)."""
    return [(x.clone(), x._version) for x in tree.leaves(state) if isinstance(x, torch.Tensor)]


def assert_untouched(state: ftrain.TrainState, before: list[tuple[torch.Tensor, int]]) -> None:
    after = [x for x in tree.leaves(state) if isinstance(x, torch.Tensor)]
    assert len(after) == len(before)
    for x, (copy, version) in zip(after, before):
        assert x._version == version and torch.equal(x, copy), "the step wrote into its input state"


def assert_bitwise(a, b, what: str) -> None:
    paths, xs, _ = tree.flatten_with_path(a)
    ys = tree.leaves(b)
    assert len(xs) == len(ys), what
    for path, x, y in zip(paths, xs, ys):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}{path} differs"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_eager_steps_equal_the_plain_module_bitwise_and_leave_their_input_untouched(model):
    train_step = ftrain.make_train_step(model.loss_fn, compile=False)
    state = ftrain.TrainState.create(model.build(0), optim.adamw(1e-3))
    reference = ftrain.TrainState.create(model.build(0), optim.adamw(1e-3))
    for i, batch in enumerate(model.batches(STEPS)):
        before = snapshot(state)
        new, metrics = train_step(state, batch)
        assert_untouched(state, before)
        reference, expected = reference_step(model, reference, batch)
        assert_bitwise(new.params, reference.params, f"step {i}: params")
        assert_bitwise(new.opt_state, reference.opt_state, f"step {i}: opt_state")
        assert_bitwise(new.buffers, reference.buffers, f"step {i}: buffers")
        assert_bitwise({k: metrics[k] for k in expected}, expected, f"step {i}: metrics")
        state = new
    if model is zoo_models.RESNET:  # (BatchNorm's running statistics moved: the buffers were compared, not idle)
        assert int(state.buffers["resnet.embedder.embedder.normalization.num_batches_tracked"]) == STEPS


def fill_seen_by(model: zoo_models.ZooModel, seen: list[bool]):
    """``model.loss_fn``, noting whether torch's NaN fill of fresh allocations is on while it runs."""

    def loss_fn(apply, params, buffers, batch, key):
        assert torch.are_deterministic_algorithms_enabled(), "the step runs in deterministic mode"
        seen.append(torch.utils.deterministic.fill_uninitialized_memory)
        return model.loss_fn(apply, params, buffers, batch, key)

    return loss_fn


def eager_steps(model: zoo_models.ZooModel, seen: list[bool], steps: int = 3) -> tuple:
    train_step = ftrain.make_train_step(fill_seen_by(model, seen), compile=False)
    state, metrics = ftrain.TrainState.create(model.build(0), optim.adamw(1e-3)), []
    for batch in model.batches(steps):
        state, step_metrics = train_step(state, batch)
        metrics.append(step_metrics)
    return state, metrics


@pytest.mark.parametrize("model", zoo_models.ALL, ids=lambda m: m.name)
def test_eager_steps_skip_the_nan_fill_and_equal_torchs_full_deterministic_mode_bitwise(model):
    assert not torch.are_deterministic_algorithms_enabled()
    seen: list[bool] = []
    state, metrics = eager_steps(model, seen)
    assert seen and not any(seen), "an eager step in ftrain's deterministic mode leaves the fill out"
    assert torch.utils.deterministic.fill_uninitialized_memory and not torch.are_deterministic_algorithms_enabled()
    # torch's full deterministic mode, turned on by the user: ftrain keeps its fill.
    torch.use_deterministic_algorithms(True)
    try:
        filled_seen: list[bool] = []
        filled, filled_metrics = eager_steps(model, filled_seen)
    finally:
        torch.use_deterministic_algorithms(False)
    assert filled_seen and all(filled_seen)
    assert_bitwise(state.params, filled.params, "params")
    assert_bitwise(state.opt_state, filled.opt_state, "opt_state")
    assert_bitwise(state.buffers, filled.buffers, "buffers")
    assert_bitwise(metrics, filled_metrics, "metrics")


def test_the_eager_steps_quick_checks_still_refuse_and_fall_back_as_the_full_ones_do():
    """apply_gradients compares flat dicts of tensors without flattening them and the fused update
    checks its leaves' types and dtypes in bulk: what the full checks refused or sent to the chain
    still is."""
    state = ftrain.TrainState.create(torch.nn.Linear(3, 2), optim.adamw(1e-2))
    grads = {name: torch.ones_like(p) for name, p in state.params.items()}
    with pytest.raises(ValueError, match="missing in grads: \\['bias'\\]"):
        state.apply_gradients({"weight": grads["weight"]})
    with pytest.raises(ValueError, match="different tree structures"):  # (same keys, a subtree for a leaf)
        state.apply_gradients({**grads, "bias": {"b": grads["bias"]}})
    # A leaf that is not a plain tensor (a Parameter here): not the fused kernels' case, the chain's.
    mixed = {**grads, "bias": torch.nn.Parameter(grads["bias"], requires_grad=False)}
    updates, _ = state.tx.update(mixed, state.opt_state, state.params)
    expected = optim.apply_updates(state.params, updates)
    assert state.tx.fused_apply(mixed, state.opt_state, state.params) is None
    assert_bitwise(state.apply_gradients(mixed).params, expected, "params")
