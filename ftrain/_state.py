"""``TrainState``: everything that changes during training, as one immutable pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from . import random, tree
from ._module import ModuleApply, extract, to_meta, to_module, trainable
from .optim._base import GradientTransformation, apply_updates

__all__ = ["TrainState", "static_field"]


ALL_FROZEN = (
    "TrainState.create: every parameter of {model} has requires_grad=False, so there is nothing to train; "
    "unfreeze the part to train (e.g. model.head.requires_grad_(True)) before creating the state"
)


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is part of the tree *structure*, not a leaf.

    Use it in a :class:`TrainState` subclass for configuration that never changes
    during training (a second apply function, a second optimizer). Static values
    must be hashable.
    """
    metadata = {**kwargs.pop("metadata", {}), "static": True}
    return dataclasses.field(metadata=metadata, **kwargs)


class ImmutableStateError(dataclasses.FrozenInstanceError):
    """Raised on an attempt to assign to a field of a :class:`TrainState`."""


@dataclasses.dataclass(frozen=True, eq=False)
class TrainState:
    """All that changes while training, as one immutable pytree.

    Leaves: ``step`` (0-d int64 tensor), ``params`` and ``buffers`` (dicts of
    detached tensors keyed by the module's dotted names), ``opt_state`` (the
    optimizer's state pytree) and ``key`` (a :mod:`ftrain.random` key). Static
    (structure, not leaves): ``apply_fn`` (the model's pure forward, see
    :class:`ftrain.ModuleApply`) and ``tx`` (the optimizer).

    Nothing mutates a state: :meth:`replace` and :meth:`apply_gradients` return
    new ones. To carry more (an EMA of the params, a loss scale, a second
    optimizer), subclass it as a frozen dataclass; the subclass is a pytree too.
    Exotic needs should compose around the state rather than add flags to it.

    Example:
        >>> import torch, ftrain
        >>> from torch import nn
        >>> state = ftrain.TrainState.create(nn.Linear(3, 1), ftrain.optim.sgd(0.1), key=ftrain.random.key(0))
        >>> int(state.step), sorted(state.params)
        (0, ['bias', 'weight'])
        >>> grads = ftrain.tree.ones_like(state.params)
        >>> int(state.apply_gradients(grads).step)
        1

    Subclassing:
        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True, eq=False)
        ... class EMAState(ftrain.TrainState):
        ...     ema: dict = dataclasses.field(default_factory=dict)
    """

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    key: torch.Tensor
    apply_fn: Callable[..., Any] = static_field()
    tx: GradientTransformation = static_field()

    _layout: ClassVar[dict[type, tuple[tuple[str, ...], tuple[str, ...]]]] = {}

    @classmethod
    def create(
        cls,
        model: nn.Module,
        tx: GradientTransformation,
        *,
        key: torch.Tensor | None = None,
        **fields: Any,
    ) -> TrainState:
        """A fresh state at step 0 from ``model`` and optimizer ``tx``.

        The parameters and buffers are taken out of ``model`` (detached, no copy)
        and ``model`` is moved to the ``meta`` device, so the state holds the only
        copy of the weights. ``key`` defaults to ``ftrain.random.key(0)``. Extra
        keyword arguments fill the fields a subclass adds.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainState.create expects a torch.nn.Module as model, got {type(model).__name__}")
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"TrainState.create expects an optimizer built by ftrain.optim (a GradientTransformation) as tx, "
                f"got {type(tx).__name__}; torch.optim optimizers mutate in place and cannot live in a pure state"
            )
        params, buffers = extract(model)
        if params and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(ALL_FROZEN.format(model=type(model).__name__))
        if not params:
            raise ValueError(
                f"TrainState.create: {type(model).__name__} has no parameters, so there is nothing to train; "
                "pass the model that owns the trainable weights"
            )
        if key is None:
            key = random.key(0)
        else:
            random.check_key(key, "TrainState.create(key=...)")
        device = tree.device_of(params)
        apply = ModuleApply(to_meta(model))
        with torch.no_grad():
            opt_state = tx.init(trainable(apply, params))
        return cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            key=key.to(device),
            apply_fn=apply,
            tx=tx,
            **fields,
        )

    def replace(self, **changes: Any) -> TrainState:
        """A new state with the given fields changed (``dataclasses.replace``)."""
        if torch.compiler.is_compiling():  # (dynamo traces the dataclass way; a bad name fails in __init__)
            return dataclasses.replace(self, **changes)
        names, plain = _REPLACEABLE.get(type(self)) or _replaceable(type(self))
        unknown = changes.keys() - names
        if unknown:
            raise TypeError(f"{type(self).__name__}.replace got unknown fields {sorted(unknown)}")
        if not plain:
            return dataclasses.replace(self, **changes)
        new = object.__new__(type(self))  # (what dataclasses.replace does, less __init__'s per-field setattr)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def apply_gradients(self, grads: Any, **changes: Any) -> TrainState:
        """One optimizer step: a new state with updated params, opt_state and ``step + 1``.

        ``grads`` must have the structure of ``params``, less the frozen ones (those with
        ``requires_grad=False`` when the state was created, which are never updated). Extra
        keyword arguments replace other fields in the same call (e.g. ``buffers=new_buffers``).
        """
        if torch.is_grad_enabled():  # (steps call it with grad off already: no context to enter)
            with torch.no_grad():
                return self.apply_gradients(grads, **changes)
        params = trainable(self.apply_fn, self.params)
        names = ["params" if params is self.params else "trainable params", "grads"]
        tree.assert_same_structure(params, grads, names=names)
        # Eager, the named optimizers apply themselves in torch.optim's kernels (None: they cannot here).
        fused = self.tx.fused_apply(grads, self.opt_state, params) if self.tx.fused_apply is not None else None
        if fused is None:
            updates, opt_state = self.tx.update(grads, self.opt_state, params)
            updated = apply_updates(params, updates)
        else:
            updated, opt_state = fused
        if params is not self.params:  # frozen params: kept as they are, in their places
            updated = {name: updated.get(name, p) for name, p in self.params.items()}
        return self.replace(step=self.step + 1, params=updated, opt_state=opt_state, **changes)

    def to_module(self) -> nn.Module:
        """A real ``nn.Module`` holding copies of this state's params and buffers.

        For export (``torch.export.export(state.to_module(), args)``) or plain
        PyTorch inference. The state is untouched.
        """
        return to_module(self.apply_fn, self.params, self.buffers)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params.values())
        extra = [f.name for f in dataclasses.fields(self) if f.name not in _BASE_FIELDS]
        more = f", fields+={extra}" if extra else ""
        return f"{type(self).__name__}(step={int(self.step) if self.step.numel() == 1 else self.step.tolist()}, params={n:,}{more})"


def _immutable_setattr(self: TrainState, name: str, value: Any) -> None:
    raise ImmutableStateError(
        f"cannot assign to {type(self).__name__}.{name}: states are immutable; "
        f"use state = state.replace({name}=...) instead"
    )


def _immutable_delattr(self: TrainState, name: str) -> None:
    raise ImmutableStateError(f"cannot delete {type(self).__name__}.{name}: states are immutable")


_BASE_FIELDS = {"step", "params", "buffers", "opt_state", "key", "apply_fn", "tx"}


_REPLACEABLE: dict[type, tuple[frozenset[str], bool]] = {}


def _replaceable(cls: type) -> tuple[frozenset[str], bool]:
    """``cls``'s field names, and whether a copy of its ``__dict__`` is all ``dataclasses.replace`` would do.

    It is unless the class has a ``__post_init__``, a field with ``init=False`` or slots.
    """
    fields = dataclasses.fields(cls)
    plain = (
        not hasattr(cls, "__post_init__")
        and all(f.init for f in fields)
        and not any("__slots__" in vars(c) for c in cls.__mro__)
    )
    _REPLACEABLE[cls] = (frozenset(f.name for f in fields), plain)
    return _REPLACEABLE[cls]


def _layout(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Computed on first use, not at registration: __init_subclass__ runs before @dataclass adds fields.
    layout = TrainState._layout.get(cls)
    if layout is None:
        fields = dataclasses.fields(cls)
        layout = (
            tuple(f.name for f in fields if not f.metadata.get("static")),
            tuple(f.name for f in fields if f.metadata.get("static")),
        )
        TrainState._layout[cls] = layout
        # @dataclass(frozen=True) installs its own __setattr__ on each subclass; ours says how to fix it.
        cls.__setattr__, cls.__delattr__ = _immutable_setattr, _immutable_delattr
    return layout


def _register(cls: type) -> None:
    def flatten(state):
        leaves, static = _layout(type(state))
        return [getattr(state, n) for n in leaves], tuple(getattr(state, n) for n in static), leaves

    def unflatten(static_values, children):
        leaves, static = _layout(cls)
        obj = object.__new__(cls)
        for name, value in zip(leaves + static, (*children, *static_values)):
            object.__setattr__(obj, name, value)
        return obj

    # Both pytree systems: optree for ftrain.tree, torch's for torch.func.vmap and dynamo.
    tree.register_node(cls, flatten, unflatten)


_register(TrainState)
_layout(TrainState)
