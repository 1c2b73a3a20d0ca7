import torch
from torch import nn

import ftrain
from ftrain import tree


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_apply_equals_forward_including_batchnorm_stats():
    reference = bn_net()
    state = ftrain.TrainState.create(bn_net(), ftrain.optim.identity())
    x = torch.randn(16, 4)
    buffers_before = tree.map(torch.clone, state.buffers)
    out, new_buffers = state.apply_fn(state.params, state.buffers, x)
    expected = reference(x)
    assert torch.equal(out, expected)
    assert tree.equal(state.buffers, buffers_before), "apply must not write into the buffers it is given"
    for name, value in reference.named_buffers():
        assert torch.equal(new_buffers[name], value), name
    assert int(new_buffers["1.num_batches_tracked"]) == 1
    reference.eval()
    eval_out, _ = state.apply_fn(state.params, new_buffers, x)  # functional_call keeps the train flag
    assert torch.equal(eval_out, expected)


def test_to_module_reproduces_outputs_and_exports():
    state = ftrain.TrainState.create(bn_net(), ftrain.optim.identity())
    x = torch.randn(5, 4)
    _, buffers = state.apply_fn(state.params, state.buffers, torch.randn(32, 4))
    state = state.replace(buffers=buffers)
    module = state.to_module().eval()
    assert module[0].weight.requires_grad and module[0].weight.device.type == "cpu"
    reference = bn_net().eval()
    reference.load_state_dict({**state.params, **state.buffers})
    assert torch.equal(module(x), reference(x))
    exported = torch.export.export(module, (x,))
    assert torch.equal(exported.module()(x), reference(x))
    module[0].weight.data.zero_()
    assert not torch.equal(state.params["0.weight"], torch.zeros_like(state.params["0.weight"]))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(self.emb(idx))


def test_tied_weights_appear_once_and_stay_tied():
    state = ftrain.TrainState.create(Tied(), ftrain.optim.identity())
    assert list(state.params) == ["emb.weight"]
    idx = torch.tensor([1, 2, 3])
    out, _ = state.apply_fn(state.params, state.buffers, idx)
    module = state.to_module()
    assert module.out.weight is module.emb.weight
    assert torch.equal(module(idx), out)
