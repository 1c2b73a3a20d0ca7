"""Pytree helpers in ftrain's own namespace, built on optree; and their traced twins.

A pytree is any nesting of dicts, lists, tuples, NamedTuples, ``None`` and
registered nodes (such as :class:`ftrain.TrainState`) whose leaves are tensors
or Python scalars. The functions here use optree with ftrain's registry
namespace, so ftrain's own node types flatten without extra arguments.

Code that ``torch.compile`` traces uses the twins built on torch's own pytree
instead (:func:`traced_leaves`, :func:`traced_map`, :func:`where`,
:func:`all_finite`): dynamo cannot trace optree's flattening of a whole state,
and ``torch.func.vmap`` flattens with torch's pytree too. :func:`register_node`
registers a node type with both, so the two always agree on ftrain's nodes
(except that torch's pytree counts ``None`` as a leaf, optree as an empty node).

Errors name the path of the offending leaf, e.g. ``params['fc.weight']``.

Example:
    >>> import torch
    >>> from ftrain import tree
    >>> t = {"w": torch.ones(2), "b": torch.zeros(1)}
    >>> tree.map(lambda x: x * 2, t)["w"]
    tensor([2., 2.])
    >>> float(tree.global_norm(t))
    1.4142135381698608
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

NAMESPACE = "ftrain"
"""The optree registry namespace ftrain registers its node types in."""

PyTree = Any
"""Any pytree (the type checkers' view: a nesting of containers cannot be typed more closely)."""

__all__ = [
    "NAMESPACE",
    "all_finite",
    "allclose",
    "assert_same_structure",
    "cast",
    "device_of",
    "equal",
    "flatten",
    "flatten_with_path",
    "full_like",
    "global_norm",
    "leaves",
    "map",
    "map_with_path",
    "ones_like",
    "register_node",
    "stack",
    "structure",
    "traced_flatten",
    "traced_leaves",
    "traced_map",
    "traced_unflatten",
    "unflatten",
    "unstack",
    "where",
    "zeros_like",
]


def register_node(cls: type, flatten_func: Callable, unflatten_func: Callable) -> type:
    """Register ``cls`` as a pytree node with optree (ftrain's namespace) and with torch's pytree.

    ``flatten_func(obj)`` returns ``(children, metadata, names)``, ``names`` being the children's
    attribute names (they make the paths in error messages); ``unflatten_func(metadata, children)``
    rebuilds the object. ``metadata`` is static: part of the structure, compared, never traced.

    >>> class Pair:
    ...     def __init__(self, a, b):
    ...         self.a, self.b = a, b
    >>> _ = register_node(Pair, lambda p: ((p.a, p.b), None, ("a", "b")), lambda _, c: Pair(*c))
    >>> leaves(Pair(1, 2)), traced_leaves(Pair(1, 2)), flatten_with_path(Pair(1, 2))[0]
    ([1, 2], [1, 2], ['a', 'b'])
    """
    optree.register_pytree_node(
        cls, flatten_func, unflatten_func, path_entry_type=optree.GetAttrEntry, namespace=NAMESPACE
    )

    def torch_flatten(obj: Any) -> tuple[list, Any]:
        children, metadata, _ = flatten_func(obj)
        return list(children), metadata

    def torch_flatten_with_keys(obj: Any) -> tuple[list, Any]:
        children, metadata, names = flatten_func(obj)
        return [(torch_pytree.GetAttrKey(n), c) for n, c in zip(names, children)], metadata

    def torch_unflatten(children: Any, metadata: Any) -> Any:
        return unflatten_func(metadata, list(children))

    torch_pytree.register_pytree_node(
        cls,
        torch_flatten,
        torch_unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=torch_flatten_with_keys,
    )
    return cls


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in flattening order."""
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def structure(tree: PyTree) -> optree.PyTreeSpec:
    """The tree structure of ``tree`` (an optree ``PyTreeSpec``)."""
    return optree.tree_structure(tree, namespace=NAMESPACE)


def flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """``(leaves, treespec)`` of ``tree``; :func:`unflatten` inverts it."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def unflatten(treespec: optree.PyTreeSpec, leaves: Sequence[Any]) -> PyTree:
    """Rebuild a tree from ``treespec`` and ``leaves``."""
    return optree.tree_unflatten(treespec, leaves)


def flatten_with_path(tree: PyTree) -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    """``(paths, leaves, treespec)``; each path is a readable string such as ``params['fc.weight']``."""
    accessors, leaves_, spec = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    return [_path_str(a) for a in accessors], leaves_, spec


def _path_str(accessor: optree.PyTreeAccessor) -> str:
    return accessor.codify("").lstrip(".") or "<root>"


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf: Callable | None = None) -> PyTree:
    """Apply ``fn`` to every leaf of ``tree`` (and the matching leaves of ``rest``).

    All trees must have the same structure; otherwise :class:`ValueError` names the
    first path where they differ.

    >>> map(lambda a, b: a + b, {"x": 1}, {"x": 2})
    {'x': 3}
    """
    if rest and not torch.compiler.is_compiling():
        # (A path-naming error for people; under dynamo optree checks the structures itself, and
        # tracing optree.tree_structure of an empty dict fails.)
        assert_same_structure(tree, *rest)
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like :func:`map`, but ``fn(path, leaf, *others)`` also receives the leaf's path string.

    >>> map_with_path(lambda p, x: p, {"a": 1})
    {'a': "['a']"}
    """
    if rest:
        assert_same_structure(tree, *rest)
    paths, leaves_, spec = flatten_with_path(tree)
    others = [spec.flatten_up_to(r) for r in rest]
    return unflatten(spec, [fn(p, x, *(o[i] for o in others)) for i, (p, x) in enumerate(zip(paths, leaves_))])


def assert_same_structure(tree: PyTree, *others: PyTree, names: Sequence[str] | None = None) -> None:
    """Raise :class:`ValueError` naming the differing paths if the trees' structures differ.

    ``names`` labels the trees in the message (default ``"tree 0"``, ``"tree 1"``, ...).
    """
    if _flat_tensor_dicts(tree, *others):
        return
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(others) + 1)]
    spec = structure(tree)
    for i, other in enumerate(others, start=1):
        other_spec = structure(other)
        if other_spec == spec:
            continue
        ref_paths = set(flatten_with_path(tree)[0])
        paths = set(flatten_with_path(other)[0])
        missing = sorted(ref_paths - paths)
        unexpected = sorted(paths - ref_paths)
        detail = []
        if missing:
            detail.append(f"missing in {names[i]}: {_short(missing)}")
        if unexpected:
            detail.append(f"unexpected in {names[i]}: {_short(unexpected)}")
        if not detail:
            detail.append(
                f"same leaf paths but different node types:\n  {names[0]}: {spec}\n  {names[i]}: {other_spec}"
            )
        raise ValueError(f"{names[0]} and {names[i]} have different tree structures; " + "; ".join(detail))


def _flat_tensor_dicts(*trees: PyTree) -> bool:
    """Are ``trees`` plain dicts with the same keys, whose values are all plain tensors (leaves)?

    Then their structures are equal, which this tells without flattening them (an eager step
    compares its params and gradients so every step: two flattens cost more than this).
    """
    first = trees[0]
    if not all(type(t) is dict and t.keys() == first.keys() for t in trees):
        return False
    return set(builtins.map(type, itertools.chain.from_iterable(t.values() for t in trees))) == {torch.Tensor}


def _short(paths: list[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def zeros_like(tree: PyTree) -> PyTree:
    """A tree of zero tensors shaped and typed like ``tree``'s leaves."""
    return map(torch.zeros_like, tree)


def ones_like(tree: PyTree) -> PyTree:
    """A tree of one-filled tensors shaped and typed like ``tree``'s leaves."""
    return map(torch.ones_like, tree)


def full_like(tree: PyTree, value: float) -> PyTree:
    """A tree of tensors filled with ``value``, shaped and typed like ``tree``'s leaves."""
    return map(lambda x: torch.full_like(x, value), tree)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all leaves taken together, as a 0-d tensor (no host sync).

    Equals ``torch.nn.utils.get_total_norm`` over the same tensors.
    """
    leaves_ = leaves(tree)
    if not leaves_:
        return torch.tensor(0.0)
    if host_readable(*leaves_):  # (on the CPU torch's foreach norm is the per-tensor norm, in one call)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(leaves_)))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in leaves_]))


def traced_leaves(tree: PyTree) -> list[Any]:
    """:func:`leaves`, flattened with torch's pytree: for code that ``torch.compile`` traces.

    ``None`` is a leaf here (optree drops it).

    >>> traced_leaves({"a": torch.ones(1), "b": None})
    [tensor([1.]), None]
    """
    return torch_pytree.tree_leaves(tree)


def traced_flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """:func:`flatten` with torch's pytree (``None`` is a leaf): for code that ``torch.compile`` traces.

    :func:`traced_unflatten` inverts it.

    >>> leaves, spec = traced_flatten({"a": torch.ones(1), "b": None})
    >>> leaves, traced_unflatten(spec, [torch.zeros(1), None])
    ([tensor([1.]), None], {'a': tensor([0.]), 'b': None})
    """
    return torch_pytree.tree_flatten(tree)


def traced_unflatten(treespec: Any, leaves: Sequence[Any]) -> PyTree:
    """Rebuild a tree from :func:`traced_flatten`'s ``treespec`` and ``leaves``."""
    return torch_pytree.tree_unflatten(leaves, treespec)


def traced_map(fn: Callable[[Any], Any], tree: PyTree) -> PyTree:
    """:func:`map` over one tree, flattened with torch's pytree: for code that ``torch.compile`` traces.

    ``fn`` sees ``None`` leaves too (see :func:`traced_leaves`).

    >>> traced_map(lambda x: x is None, {"a": torch.ones(1), "b": None})
    {'a': False, 'b': True}
    """
    return torch_pytree.tree_map(fn, tree)


def where(pred: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf by leaf ``torch.where(pred, a, b)`` over two same-structured trees, without a branch or host sync.

    Non-tensor leaves are taken from ``on_true``. Flattened with torch's pytree, like :func:`traced_map`
    (this runs inside compiled steps).

    >>> where(torch.tensor(False), {"a": torch.ones(2)}, {"a": torch.zeros(2)})
    {'a': tensor([0., 0.])}
    """
    a, spec = torch_pytree.tree_flatten(on_true)
    b, spec_b = torch_pytree.tree_flatten(on_false)
    if spec != spec_b:
        assert_same_structure(on_true, on_false, names=["on_true", "on_false"])
    out = [torch.where(pred, x, y) if isinstance(x, torch.Tensor) else x for x, y in zip(a, b)]
    return torch_pytree.tree_unflatten(out, spec)


def all_finite(tree: PyTree) -> torch.Tensor:
    """A 0-d bool tensor: are all floating leaves of ``tree`` finite? (No host sync; traced like :func:`where`.)

    >>> all_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
    tensor(False)
    """
    flags = [
        torch.isfinite(x).all() for x in traced_leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()
    ]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def device_of(tree: PyTree, *, default: torch.device | str | None = "cpu") -> torch.device:
    """The device of the first tensor leaf of ``tree`` (of a state: of its ``params``).

    An empty tree gives ``default``; with ``default=None`` it raises a TypeError instead.

    >>> device_of({"w": torch.zeros(2)})
    device(type='cpu')
    """
    params = getattr(tree, "params", None)
    for part in (params, tree) if params is not None else (tree,):
        first = _first_value(part)
        if isinstance(first, torch.Tensor):
            return first.device
        for leaf in leaves(part):
            if isinstance(leaf, torch.Tensor):
                return leaf.device
    if default is None:
        raise TypeError(f"expected a TrainState (a pytree of tensors), got {type(tree).__name__} with no tensors")
    return torch.device(default)


def host_readable(*tensors: torch.Tensor) -> bool:
    """Can Python read these tensors' values at no cost? Plain CPU tensors, in eager code, outside
    ``torch.func`` transforms and dispatch modes (a fake-tensor check, a FLOP counter).

    Then per-step scalar bookkeeping (a key's hash, bias corrections) is cheaper as Python
    arithmetic than as tiny tensor ops; elsewhere reading a value would wait for the device or
    break a trace.

    >>> host_readable(torch.tensor(3)), host_readable(torch.tensor(3, device="meta"))
    (True, False)
    """
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    return not is_in_torch_dispatch_mode() and all(type(t) is torch.Tensor and t.is_cpu for t in tensors)


def _first_value(part: Any) -> Any:
    """The first leaf of a dict of tensors (params, grads) without flattening it all (a step asks
    several times): optree orders a dict by its sorted keys. ``None`` for anything else."""
    if type(part) is not dict or not part:
        return None
    try:
        return part[min(part)]
    except TypeError:  # (keys that do not sort: optree keeps their insertion order)
        return None


def cast(tree: PyTree, dtype: torch.dtype) -> PyTree:
    """Cast the floating-point leaves of ``tree`` to ``dtype``; other leaves pass through."""
    return map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack a list of same-structured trees leaf by leaf along a new leading dim.

    The result feeds ``torch.func.vmap``; :func:`unstack` inverts it.

    >>> stack([{"a": torch.tensor(1)}, {"a": torch.tensor(2)}])
    {'a': tensor([1, 2])}
    """
    trees = list(trees)
    if not trees:
        raise ValueError("tree.stack needs at least one tree, got an empty sequence")
    assert_same_structure(*trees, names=[f"trees[{i}]" for i in range(len(trees))])
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees, namespace=NAMESPACE)


def unstack(tree: PyTree) -> list[PyTree]:
    """Split a stacked tree along its leading dim into a list of trees."""
    paths, leaves_, spec = flatten_with_path(tree)
    if not leaves_:
        raise ValueError("tree.unstack needs a tree with at least one tensor leaf")
    sizes = {p: x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None for p, x in zip(paths, leaves_)}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"tree.unstack needs every leaf to share one leading dim; got leading sizes {sizes}")
    n = next(iter(sizes.values()))
    return [unflatten(spec, [x[i] for x in leaves_]) for i in builtins.range(n)]


def equal(a: PyTree, b: PyTree) -> bool:
    """True if both trees have the same structure and bitwise-equal leaves (same dtype and shape)."""
    if structure(a) != structure(b):
        return False
    return all(_leaf_equal(x, y) for x, y in zip(leaves(a), leaves(b)))


def _leaf_equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))
    return type(x) is type(y) and x == y


def allclose(a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """True if both trees have the same structure and every pair of leaves is close (``torch.allclose``)."""
    if structure(a) != structure(b):
        return False
    return all(
        torch.allclose(torch.as_tensor(x).double(), torch.as_tensor(y).double(), rtol=rtol, atol=atol)
        for x, y in zip(leaves(a), leaves(b))
    )
