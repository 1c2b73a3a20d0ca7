import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ftrain import tree


def make_tree():
    return {"a": torch.arange(3.0), "b": (torch.ones(2, 2), {"c": torch.zeros(1, dtype=torch.float64)})}


def test_map_and_paths():
    t = make_tree()
    doubled = tree.map(lambda x: x * 2, t)
    assert torch.equal(doubled["a"], torch.tensor([0.0, 2.0, 4.0]))
    paths = tree.map_with_path(lambda p, x: p, t)
    assert paths["b"][1]["c"] == "['b'][1]['c']"
    summed = tree.map(lambda x, y: x + y, t, t)
    assert tree.allclose(summed, doubled)


def test_mismatched_structure_names_paths():
    a = {"w": torch.ones(1), "b": torch.ones(1)}
    b = {"w": torch.ones(1), "bias": torch.ones(1)}
    with pytest.raises(ValueError, match=r"missing in tree 1: \['b'\].*unexpected in tree 1: \['bias'\]"):
        tree.map(lambda x, y: x + y, a, b)


def test_zeros_ones_full_cast():
    t = make_tree()
    z = tree.zeros_like(t)
    assert all(bool((x == 0).all()) for x in tree.leaves(z))
    assert all(x.dtype == y.dtype for x, y in zip(tree.leaves(z), tree.leaves(t)))
    assert all(bool((x == 1).all()) for x in tree.leaves(tree.ones_like(t)))
    assert all(bool((x == 7).all()) for x in tree.leaves(tree.full_like(t, 7)))
    c = tree.cast({"f": torch.ones(1), "i": torch.ones(1, dtype=torch.int64)}, torch.bfloat16)
    assert c["f"].dtype == torch.bfloat16 and c["i"].dtype == torch.int64


def test_global_norm_matches_torch():
    t = make_tree()
    expected = torch.nn.utils.get_total_norm([x.double() for x in tree.leaves(t)])
    assert torch.allclose(tree.global_norm(t).double(), expected)


def test_stack_unstack_roundtrip():
    trees = [tree.map(lambda x, i=i: x + i, make_tree()) for i in range(3)]
    stacked = tree.stack(trees)
    assert stacked["a"].shape == (3, 3)
    for a, b in zip(tree.unstack(stacked), trees):
        assert tree.equal(a, b)
    with pytest.raises(ValueError, match="empty"):
        tree.stack([])
    with pytest.raises(ValueError, match="leading"):
        tree.unstack({"a": torch.ones(2), "b": torch.ones(3)})


def test_equal_and_allclose():
    t = make_tree()
    assert tree.equal(t, tree.map(torch.clone, t))
    assert not tree.equal(t, tree.map(lambda x: x + 1e-7, t))
    assert tree.allclose(t, tree.map(lambda x: x + 1e-9, t))
    assert not tree.equal(t, {"a": t["a"]})
    assert not tree.equal({"x": torch.ones(1)}, {"x": torch.ones(1, dtype=torch.float64)})


def test_flatten_unflatten_is_optree():
    t = make_tree()
    leaves, spec = tree.flatten(t)
    assert spec == optree.tree_structure(t)
    assert tree.equal(tree.unflatten(spec, leaves), t)


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8), st.integers(1, 4))
def test_global_norm_is_norm_of_concatenation(values, splits):
    flat = torch.tensor(values, dtype=torch.float64)
    t = {str(i): chunk for i, chunk in enumerate(flat.chunk(splits))}
    assert torch.allclose(tree.global_norm(t), flat.norm())


class Pair:
    def __init__(self, first, second):
        self.first, self.second = first, second


tree.register_node(Pair, lambda p: ((p.first, p.second), None, ("first", "second")), lambda _, c: Pair(*c))


def test_register_node_registers_with_optree_and_torchs_pytree():
    pair = Pair(torch.ones(1), {"x": torch.zeros(2)})
    assert tree.flatten_with_path(pair)[0] == ["first", "second['x']"]
    assert tree.traced_leaves(pair) == tree.leaves(pair)
    doubled = tree.traced_map(lambda x: x * 2, pair)
    assert isinstance(doubled, Pair) and torch.equal(doubled.first, torch.full((1,), 2.0))
    # What torch.func.vmap and dynamo see: torch's pytree, with the attribute names as keys.
    keyed, _ = torch.utils._pytree.tree_flatten_with_path(pair)
    assert [torch.utils._pytree.keystr(path) for path, _ in keyed] == [".first", ".second['x']"]


def test_traced_twins_agree_with_optree_but_keep_none_as_a_leaf():
    t = {**make_tree(), "none": None}
    assert tree.traced_leaves(t) == [*tree.leaves(t), None]
    assert tree.equal(tree.traced_map(lambda x: x if x is None else x + 1, t), tree.map(lambda x: x + 1, t))


def test_where_and_all_finite_select_leaf_by_leaf():
    t, zeros = make_tree(), tree.zeros_like(make_tree())
    assert tree.equal(tree.where(torch.tensor(True), t, zeros), t)
    assert tree.equal(tree.where(torch.tensor(False), t, zeros), zeros)
    assert bool(tree.all_finite(t)) and not bool(tree.all_finite({**t, "a": torch.tensor([float("inf")])}))
