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
