"""Transformations that wrap other transformations: masking, partitioning, accumulation,
skipping non-finite steps and hyperparameters held in the state."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch

from .. import tree
from .._validate import check_int, check_number
from ..tree import PyTree
from ._base import GradientTransformation, materialize, zero_count
from ._report import record, report_group

__all__ = [
    "ApplyIfFiniteState",
    "InjectHyperparamsState",
    "MaskedNode",
    "MaskedState",
    "MultiSteps",
    "MultiStepsState",
    "PartitionState",
    "apply_if_finite",
    "get_hyperparams",
    "inject_hyperparams",
    "masked",
    "partition",
    "set_hyperparams",
]


def _check_transform(owner: str, what: str, tx: Any) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"{owner}: {what} must be a GradientTransformation (e.g. optim.adam(1e-3)), got {type(tx).__name__}"
        )


# --- selecting a subset of the leaves ------------------------------------------------------
# A leaf left out of a subset is replaced by MaskedNode(), an empty node for both optree and torch's
# pytree (None would be a leaf to torch's, which breaks vmap): the inner transformation never sees
# it, and its state has MaskedNode() in that place too.


class MaskedNode(NamedTuple):
    """Stands in the optimizer state for a parameter that a :func:`masked` or :func:`partition`
    transformation does not update (an empty pytree node: it holds no tensors)."""


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def _drop_masked(t: PyTree) -> PyTree:
    if isinstance(t, dict):
        return {k: _drop_masked(v) for k, v in t.items() if not _is_masked_node(v)}
    return t


def _resolve_labels(owner: str, what: str, spec_or_fn: Any, params: PyTree) -> tuple[PyTree, list[Any]]:
    """``(labels_tree, labels)``: one label per present leaf of ``params``.

    Inside :func:`partition` or another :func:`masked`, the params hold ``MaskedNode()`` where a
    leaf belongs to another group. The labels may then either cover every original parameter
    (the entries at those places are ignored) or only the present ones.
    """
    labels_tree = spec_or_fn(params) if callable(spec_or_fn) else spec_or_fn
    if tree.structure(labels_tree) == tree.structure(params):
        return labels_tree, tree.leaves(labels_tree)
    full, full_spec = optree.tree_flatten(params, is_leaf=_is_masked_node, namespace=tree.NAMESPACE)
    if optree.tree_structure(labels_tree, namespace=tree.NAMESPACE) == full_spec:
        labels = tree.leaves(labels_tree)
        return labels_tree, [lab for lab, p in zip(labels, full) if not _is_masked_node(p)]
    present = _drop_masked(params)
    try:
        tree.assert_same_structure(present, labels_tree, names=["params", what])
    except ValueError as e:
        raise ValueError(
            f"{owner}: the {what} must have the structure of the params (one entry per parameter); {e}"
        ) from None
    return labels_tree, tree.leaves(labels_tree)


def _label_paths(labels_tree: PyTree) -> list[str]:
    # Only on the error path: path strings are not needed (nor cheap to trace) otherwise.
    return tree.flatten_with_path(labels_tree)[0]


class _Resolved:
    """The labels of the params' leaves, worked out once (in ``init``, which runs eagerly).

    Working them out walks Python trees of bools/strings, which ``torch.compile`` cannot trace
    with fullgraph; the result depends only on the params' structure, so the compiled
    ``update`` reuses it, keyed by the mask (or labels) object and the leaf count, the only
    thing the trace can check for free. The store is shared by every transformation built
    from the same mask object, because :func:`inject_hyperparams` rebuilds the inner
    transformation at each update.
    """

    _store: dict[tuple[str, int, int], tuple[Any, list[Any]]] = {}

    def __init__(self, kind: str, spec: Any) -> None:
        self._kind, self._spec = kind, spec

    def _key(self, params: PyTree) -> tuple[str, int, int]:
        return (self._kind, id(self._spec), len(tree.leaves(params)))

    def get(self, params: PyTree) -> list[Any] | None:
        if not torch.compiler.is_compiling():
            return None  # eager: check the structure every time, for clear errors
        entry = self._store.get(self._key(params))
        return entry[1] if entry is not None and entry[0] is self._spec else None

    def put(self, params: PyTree, labels: list[Any]) -> list[Any]:
        self._store[self._key(params)] = (self._spec, labels)
        return labels


def _select(t: PyTree, keep: Sequence[bool]) -> PyTree:
    leaves, spec = tree.flatten(t)
    return tree.unflatten(spec, [x if k else MaskedNode() for x, k in zip(leaves, keep)])


def _merge(t: PyTree, keep: Sequence[bool], inner: PyTree) -> PyTree:
    leaves, spec = tree.flatten(t)
    inner_leaves = iter(tree.leaves(inner))
    return tree.unflatten(spec, [next(inner_leaves) if k else x for x, k in zip(leaves, keep)])


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner state over the selected leaves (``MaskedNode()`` elsewhere)."""

    inner_state: PyTree


def masked(inner: GradientTransformation, mask: PyTree | Callable[[PyTree], PyTree]) -> GradientTransformation:
    """Apply ``inner`` only to the leaves where ``mask`` is ``True``; others pass through untouched.

    ``mask`` is a tree of Python bools with the params' structure, or a function of the params
    returning one (e.g. "no decay on biases"). Like a torch.optim parameter group that gets a
    different treatment; the inner state only covers the selected leaves.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = masked(optim.scale(0.0), {"w": True, "b": False})
    >>> p = {"w": torch.ones(1), "b": torch.ones(1)}
    >>> u, _ = tx.update(p, tx.init(p), p)
    >>> u["w"], u["b"]
    (tensor([0.]), tensor([1.]))
    """
    _check_transform("masked", "inner", inner)

    resolved = _Resolved("masked", mask)

    def resolve(params: PyTree) -> list[bool]:
        if (cached := resolved.get(params)) is not None:
            return cached
        mask_tree, flags = _resolve_labels("masked", "mask", mask, params)
        if not all(isinstance(flag, bool) for flag in flags):
            for path, flag in zip(_label_paths(mask_tree), tree.leaves(mask_tree)):
                if not isinstance(flag, bool):
                    raise TypeError(f"masked: mask{path} is {flag!r}; each mask entry must be True or False")
        return resolved.put(params, flags)

    def init(params: PyTree) -> MaskedState:
        return MaskedState(inner.init(_select(params, resolve(params))))

    def update(updates: PyTree, state: MaskedState, params: PyTree = None):
        if params is None and callable(mask):
            raise ValueError("masked: a callable mask needs the params; call tx.update(grads, opt_state, params)")
        flags = resolve(params if params is not None else updates)
        sub_params = None if params is None else _select(params, flags)
        sub_updates, inner_state = inner.update(_select(updates, flags), state.inner_state, sub_params)
        return _merge(updates, flags, sub_updates), MaskedState(inner_state)

    return GradientTransformation(init, update)


class PartitionState(NamedTuple):
    """State of :func:`partition`: one inner state per label."""

    inner_states: dict[str, PyTree]


def partition(
    transforms: Mapping[str, GradientTransformation],
    param_labels: PyTree | Callable[[PyTree], PyTree],
) -> GradientTransformation:
    """Different transformations for labelled groups of parameters (torch.optim's param groups).

    ``param_labels`` gives each parameter a label (a tree of strings shaped like the params, or a
    function of the params returning one); ``transforms[label]`` updates the parameters with that
    label. Use it for a GAN (generator vs discriminator) or fine-tuning (frozen backbone via
    ``optim.set_to_zero()``, a small learning rate for the body, a large one for the head).

    >>> import torch
    >>> from ftrain import optim
    >>> tx = partition({"body": optim.sgd(0.1), "head": optim.sgd(1.0)}, {"w": "body", "h": "head"})
    >>> p = {"w": torch.zeros(1), "h": torch.zeros(1)}
    >>> u, _ = tx.update({"w": torch.ones(1), "h": torch.ones(1)}, tx.init(p), p)
    >>> u["w"], u["h"]
    (tensor([-0.1000]), tensor([-1.]))
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError(f"partition: transforms must be a non-empty dict label -> transformation, got {transforms!r}")
    for label, tx in transforms.items():
        _check_transform("partition", f"transforms[{label!r}]", tx)

    resolved = _Resolved("partition", param_labels)

    def resolve(params: PyTree) -> list[Any]:
        if (cached := resolved.get(params)) is not None:
            return cached
        labels_tree, labels = _resolve_labels("partition", "param_labels", param_labels, params)
        if not all(label in transforms for label in labels):
            missing: dict[Any, list[str]] = {}
            for path, label in zip(_label_paths(labels_tree), tree.leaves(labels_tree)):
                if label not in transforms:
                    missing.setdefault(label, []).append(path)
            detail = "; ".join(f"label {lab!r} on params{', params'.join(ps[:5])}" for lab, ps in missing.items())
            raise ValueError(
                f"partition: no transformation for {detail}; transforms has labels {sorted(transforms)}. "
                "Add a transformation for each label (optim.set_to_zero() freezes a group)."
            )
        return resolved.put(params, labels)

    def init(params: PyTree) -> PartitionState:
        labels = resolve(params)
        return PartitionState(
            {lab: tx.init(_select(params, [x == lab for x in labels])) for lab, tx in transforms.items()}
        )

    def update(updates: PyTree, state: PartitionState, params: PyTree = None):
        if params is None and callable(param_labels):
            raise ValueError("partition: callable param_labels need the params; call tx.update(grads, state, params)")
        labels = resolve(params if params is not None else updates)
        new_states = {}
        for lab, tx in transforms.items():
            flags = [x == lab for x in labels]
            sub_params = None if params is None else _select(params, flags)
            (sub_updates, new_states[lab]), reported = record(
                tx.update, _select(updates, flags), state.inner_states[lab], sub_params
            )
            report_group(lab, reported)  # one "lr/<label>" per group
            updates = _merge(updates, flags, sub_updates)
        return updates, PartitionState(new_states)

    return GradientTransformation(init, update)


# --- updating only on some steps, without a branch ---------------------------------------------


def _zeros_unless(cond: torch.Tensor, updates: PyTree) -> PyTree:
    """``updates`` where ``cond`` holds, else zeros of the same shape (a ``torch.where``, not an ``if``)."""
    return tree.where(cond, updates, tree.zeros_like(updates))


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps`: micro-step within the current accumulation, number of
    inner updates so far, the inner state and the running mean of the gradients."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_opt_state: PyTree
    acc_grads: PyTree


class MultiSteps(GradientTransformation):
    """Gradient accumulation as a pure transformation: ``opt`` updates once every k micro-steps.

    Micro-steps return zero updates and only accumulate the running mean of the gradients; the
    k-th applies ``opt`` to that mean. With equal micro-batches of a mean-reduced loss this equals
    one step on the concatenated batch. ``every_k_schedule`` is an int or a function of the number
    of inner updates so far (a 0-d tensor) returning k. There is no branch: the inner update is
    computed every micro-step and selected with ``torch.where`` so the step compiles to one graph
    (cost: one optimizer update per micro-step, small next to forward and backward).

    Unlike optax, the object already *is* a GradientTransformation (``.gradient_transformation()``
    returns itself, for code written for optax).

    >>> import torch
    >>> from ftrain import optim
    >>> tx = MultiSteps(optim.sgd(1.0), every_k_schedule=2)
    >>> p = {"w": torch.zeros(1)}
    >>> s = tx.init(p)
    >>> u, s = tx.update({"w": torch.tensor([1.0])}, s, p)
    >>> u["w"]
    tensor([0.])
    >>> u, s = tx.update({"w": torch.tensor([3.0])}, s, p)
    >>> u["w"], bool(MultiSteps.has_updated(s))
    (tensor([-2.]), True)
    """

    def __new__(cls, opt: GradientTransformation, every_k_schedule: int | Callable[[torch.Tensor], Any]):
        _check_transform("MultiSteps", "opt", opt)
        if not callable(every_k_schedule) and (
            isinstance(every_k_schedule, bool) or not isinstance(every_k_schedule, int) or every_k_schedule < 1
        ):
            raise ValueError(
                f"MultiSteps: every_k_schedule must be an int >= 1 or a schedule, got {every_k_schedule!r}"
            )

        def init(params: PyTree) -> MultiStepsState:
            return MultiStepsState(zero_count(params), zero_count(params), opt.init(params), tree.zeros_like(params))

        def update(updates: PyTree, state: MultiStepsState, params: PyTree = None):
            k = every_k_schedule(state.gradient_step) if callable(every_k_schedule) else every_k_schedule
            n = state.mini_step + 1
            acc = tree.map(lambda a, g: a + (g - a) / n.to(a.dtype), state.acc_grads, updates)
            emit = n >= k
            inner_updates, inner_state = opt.update(acc, state.inner_opt_state, params)
            new_state = MultiStepsState(
                mini_step=torch.where(emit, torch.zeros_like(n), n),
                gradient_step=state.gradient_step + emit.to(state.gradient_step.dtype),
                inner_opt_state=tree.where(emit, inner_state, state.inner_opt_state),
                acc_grads=_zeros_unless(~emit, acc),
            )
            return _zeros_unless(emit, inner_updates), new_state

        return super().__new__(cls, init, update)

    @staticmethod
    def has_updated(state: MultiStepsState) -> torch.Tensor:
        """A 0-d bool tensor: did the last update apply the inner optimizer?"""
        return torch.logical_and(state.mini_step == 0, state.gradient_step > 0)

    def gradient_transformation(self) -> GradientTransformation:
        """This transformation (optax's ``MultiSteps`` needs this call; ours does not)."""
        return self

    def __copy__(self) -> MultiSteps:
        return self

    def __deepcopy__(self, memo: dict) -> MultiSteps:
        return self


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`: consecutive and total non-finite steps, whether the
    last gradients were finite, and the inner state."""

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: PyTree


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int = 10**9) -> GradientTransformation:
    """Skip updates whose gradients hold a NaN or an infinity, and count them.

    A skipped step returns zero updates and keeps the inner state unchanged. After more than
    ``max_consecutive_errors`` skipped steps in a row the update is applied anyway (so a run
    that is truly broken surfaces). The check is a tensor, so no host sync and no graph break;
    read ``total_notfinite`` from the state when you log.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = apply_if_finite(optim.sgd(1.0))
    >>> p = {"w": torch.zeros(1)}
    >>> u, s = tx.update({"w": torch.tensor([float("nan")])}, tx.init(p), p)
    >>> u["w"], int(s.total_notfinite)
    (tensor([0.]), 1)
    """
    _check_transform("apply_if_finite", "inner", inner)
    check_int(max_consecutive_errors, "max_consecutive_errors", who="apply_if_finite", low=None)

    def init(params: PyTree) -> ApplyIfFiniteState:
        # Separate tensors, never one shared: dynamo guards on aliasing, and a step that aliases
        # on its first call but not later would recompile.
        count = zero_count(params)
        finite = torch.ones((), dtype=torch.bool, device=count.device)
        return ApplyIfFiniteState(count, finite, zero_count(params), inner.init(params))

    def update(updates: PyTree, state: ApplyIfFiniteState, params: PyTree = None):
        # .to: an empty tree's flag is made on the CPU, and the state must stay on its device.
        finite = tree.all_finite(updates).to(state.last_finite.device)
        inner_updates, inner_state = inner.update(updates, state.inner_state, params)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count), state.notfinite_count + 1)
        apply = torch.logical_or(finite, notfinite_count > max_consecutive_errors)
        return _zeros_unless(apply, inner_updates), ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=finite,
            total_notfinite=state.total_notfinite + (~finite).to(state.total_notfinite.dtype),
            inner_state=tree.where(apply, inner_state, state.inner_state),
        )

    return GradientTransformation(init, update)


# --- hyperparameters as state ---------------------------------------------------------------


class InjectHyperparamsState(NamedTuple):
    """State of an optimizer built through :func:`inject_hyperparams`.

    ``hyperparams`` maps each numeric hyperparameter to a 0-d tensor: the value used by the last
    update (schedules are evaluated at ``count``). Change one with :func:`set_hyperparams`.
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: PyTree


_ALWAYS_STATIC = frozenset({"mask", "param_labels"})


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    *,
    static_args: Sequence[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state as 0-d tensors.

    Calling the result with the factory's arguments gives a transformation whose state holds
    every float argument (learning rate, betas, weight decay, ... including defaults) as a
    tensor, and evaluates every schedule argument at the step count. Because they are tensors,
    reading or changing them between steps (:func:`set_hyperparams`) never recompiles a
    compiled step. Bools, ``None``, masks and names in ``static_args`` stay Python values.
    The tensors take ``hyperparam_dtype``, else float64 for float64 params and float32 otherwise
    (a bfloat16 0.999 would round to 1.0).

    >>> import torch
    >>> from ftrain import optim
    >>> tx = inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.01)
    >>> s = tx.init({"w": torch.zeros(2)})
    >>> s.hyperparams["learning_rate"]
    tensor(0.0010)
    >>> s = optim.set_hyperparams(s, learning_rate=1e-4)
    >>> s.hyperparams["learning_rate"]
    tensor(1.0000e-04)
    """
    if not callable(inner_factory):
        raise TypeError(f"inject_hyperparams expects an optimizer factory such as optim.adam, got {inner_factory!r}")
    sig = inspect.signature(inner_factory)
    static_names = _ALWAYS_STATIC | set(static_args)

    @functools.wraps(inner_factory)
    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        # Build once with the Python values: this is where bad hyperparameters are reported.
        inner_factory(**arguments)
        numeric, schedules, static = {}, {}, {}
        for name, value in arguments.items():
            if name in static_names or isinstance(value, bool) or value is None:
                static[name] = value
            elif isinstance(value, (int, float, torch.Tensor)):
                numeric[name] = value
            elif callable(value):
                schedules[name] = value
            else:
                static[name] = value

        def as_tensor(value: Any, like: dict) -> torch.Tensor:
            return torch.as_tensor(value).detach().to(dtype=like["dtype"], device=like["device"])

        def init(params: PyTree) -> InjectHyperparamsState:
            like = {"dtype": hyperparam_dtype or _float_dtype(params), "device": tree.device_of(params)}
            count = zero_count(params)
            hp = {name: as_tensor(v, like) for name, v in numeric.items()}
            hp.update({name: as_tensor(fn(count), like) for name, fn in schedules.items()})
            inner = inner_factory(**static, **hp)
            return InjectHyperparamsState(count, hp, inner.init(params))

        def update(updates: PyTree, state: InjectHyperparamsState, params: PyTree = None):
            hp = dict(state.hyperparams)
            for name, fn in schedules.items():
                old = state.hyperparams[name]
                (value,) = materialize(torch.as_tensor(fn(state.count)))
                hp[name] = value.to(dtype=old.dtype, device=old.device)
            inner = inner_factory(**static, **hp)
            updates, inner_state = inner.update(updates, state.inner_state, params)
            return updates, InjectHyperparamsState(state.count + 1, hp, inner_state)

        return GradientTransformation(init, update)

    return wrapped


def _float_dtype(params: PyTree) -> torch.dtype:
    # float64 params get float64 hyperparameters (exact against torch.optim); anything narrower
    # gets float32: in bfloat16, b2=0.999 rounds to 1.0 and Adam's bias correction divides by 0.
    for leaf in tree.leaves(params):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return torch.float64 if leaf.dtype == torch.float64 else torch.float32
    return torch.float32


def _is_inject_state(x: Any) -> bool:
    return isinstance(x, InjectHyperparamsState)


def set_hyperparams(opt_state: PyTree, **values: float | torch.Tensor) -> PyTree:
    """A new optimizer state with injected hyperparameters changed (the old one is untouched).

    Finds every :class:`InjectHyperparamsState` inside ``opt_state`` (also inside a chain or a
    partition) that has the named hyperparameters, and stores the new values as tensors of the
    old dtype and device, so a compiled step does not recompile. A hyperparameter driven by a
    schedule is recomputed at the next update, so setting it has no lasting effect.

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    >>> s = optim.set_hyperparams(tx.init({"w": torch.zeros(1)}), learning_rate=0.01)
    >>> optim.get_hyperparams(s)["learning_rate"]
    tensor(0.0100)
    """
    lr = values.get("learning_rate")
    if isinstance(lr, (int, float)):  # a tensor is not read: that would sync the host
        check_number(lr, "learning_rate", who="set_hyperparams", low=0)
    found: set[str] = set()
    available: set[str] = set()

    def replace(node: Any) -> Any:
        if not _is_inject_state(node):
            return node
        available.update(node.hyperparams)
        hp = dict(node.hyperparams)
        for name, value in values.items():
            if name in hp:
                old = hp[name]
                hp[name] = torch.as_tensor(value).detach().to(dtype=old.dtype, device=old.device)
                found.add(name)
        return node._replace(hyperparams=hp)

    new_state = optree.tree_map(replace, opt_state, is_leaf=_is_inject_state, namespace=tree.NAMESPACE)
    missing = sorted(set(values) - found)
    if missing:
        raise KeyError(
            f"set_hyperparams: no injected hyperparameter named {missing}; the optimizer state has "
            f"{sorted(available) or 'none'} (wrap the optimizer with optim.inject_hyperparams to make them settable)"
        )
    return new_state


def get_hyperparams(opt_state: PyTree) -> dict[str, torch.Tensor]:
    """The injected hyperparameters found in ``opt_state`` (the values used by the last update).

    >>> import torch
    >>> from ftrain import optim
    >>> tx = optim.inject_hyperparams(optim.adam)(learning_rate=0.1)
    >>> sorted(optim.get_hyperparams(tx.init({"w": torch.zeros(1)})))
    ['b1', 'b2', 'eps', 'learning_rate', 'weight_decay']
    """
    out: dict[str, torch.Tensor] = {}
    leaves = optree.tree_leaves(opt_state, is_leaf=_is_inject_state, namespace=tree.NAMESPACE)
    for node in leaves:
        if _is_inject_state(node):
            out.update(node.hyperparams)
    return out
