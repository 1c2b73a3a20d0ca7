"""The bridge between an ``nn.Module`` and ftrain's pure world.

:func:`extract` takes a module's parameters and buffers out as plain detached
tensors; :class:`ModuleApply` is the module's forward as a pure function of
them; :func:`to_module` puts a state's tensors back into a real module for
export or plain-PyTorch use.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import random
from ._dropout import KeyedRandomness

__all__ = ["BoundApply", "ModuleApply", "extract", "to_meta", "to_module", "trainable"]


def extract(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Take ``(params, buffers)`` out of ``module`` as dicts keyed by dotted names.

    The tensors are detached with ``requires_grad=False`` (a graph kept alive in a
    state would chain step to step and leak memory). They share storage with the
    module's tensors; :meth:`TrainState.create` then moves the module to ``meta``,
    so the state holds the only copy. Tied parameters appear once.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    for name, t in {**params, **buffers}.items():
        if t.device.type == "meta":
            raise ValueError(
                f"{type(module).__name__}.{name} is on the meta device (no data); "
                "build the model on a real device, or load its weights first"
            )
    return params, buffers


def to_meta(module: nn.Module) -> nn.Module:
    """Move ``module``'s tensors to the ``meta`` device in place, keeping tied tensors tied.

    (``module.to("meta")`` unties them: it converts each owner's reference separately.)
    """
    fresh: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for slots, make in ((sub._parameters, _meta_param), (sub._buffers, _meta_tensor)):
            for name, t in slots.items():
                if t is not None:
                    if id(t) not in fresh:  # a tied tensor: the second owner gets the first's meta copy
                        fresh[id(t)] = make(t)
                    slots[name] = fresh[id(t)]
    return module


def _meta_tensor(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _meta_param(p: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(_meta_tensor(p), requires_grad=p.requires_grad)


class ModuleApply:
    """A module's forward as a pure function: ``apply(params, buffers, *args, **kwargs)``.

    Returns ``(output, new_buffers)``. The buffers passed in are never written:
    they are cloned first, so BatchNorm's running statistics come out as new
    tensors. The module itself is kept on the ``meta`` device as a skeleton.
    Two applies compare equal when they wrap the same architecture, so states
    of separately built copies of a model share one tree structure (and can be
    stacked for ``vmap``).

    ``frozen`` holds the names of the parameters that had ``requires_grad=False``
    when the apply was made: steps take no gradient for them and optimizers do
    not update them (see :func:`trainable`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> params, buffers = extract(net)
        >>> apply = ModuleApply(net)
        >>> out, new_buffers = apply(params, buffers, torch.ones(1, 2))
        >>> out.shape
        torch.Size([1, 1])
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.frozen = frozenset(name for name, p in module.named_parameters() if not p.requires_grad)
        self._signature = (type(module), repr(module), self.frozen)
        self._slots: list[tuple[dict, str, str, bool, torch.Tensor]] | None = None
        self._holding = 0
        # Whether eager keyed calls need the dropout-rerouting mode (see __call__): yes for dropout
        # modules; otherwise until a keyed training forward has run under it and drawn nothing.
        self._draws: bool | None = True if _has_dropout(module) else None

    def __call__(
        self, params: dict, buffers: dict, *args: Any, key: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[Any, dict]:
        """Run the forward; with ``key`` (an :mod:`ftrain.random` key) dropout draws its masks from it.

        Without ``key`` dropout uses torch's global RNG, as the plain module would.
        """
        new_buffers = {name: b.clone() for name, b in buffers.items()}
        if torch.compiler.is_compiling():  # (dynamo traces functional_call's swap; nothing is left bound)
            if key is None:
                return functional_call(self.module, (params, new_buffers), args, kwargs), new_buffers
            with KeyedRandomness(key):  # reroutes dropout to key-driven masks
                return functional_call(self.module, (params, new_buffers), args, kwargs), new_buffers
        self._bind(params, new_buffers)
        try:
            if key is None or self._draws is False:
                return self.module(*args, **kwargs), new_buffers
            mode = KeyedRandomness(key)
            with mode:
                out = self.module(*args, **kwargs)
            # A TorchFunctionMode costs Python on every torch call (half a small model's eager forward):
            # a model without dropout modules whose keyed training forward drew nothing (and called
            # no global-RNG function, which raises in the mode) runs later eager calls without it.
            if self._draws is None and self.module.training:
                self._draws = mode.calls > 0
            return out, new_buffers
        finally:
            if not self._holding:
                self._unbind()

    def hold(self) -> _Holding:
        """Keep the tensors of the calls made within bound to the module until the context exits.

        An eager backward may run the module again (activation checkpointing recomputes its
        segments then), after the call that bound the tensors has returned.
        """
        return _Holding(self)

    def _bind(self, params: dict, buffers: dict) -> None:
        # Eager calls set the module's tensor slots directly: functional_call walks the module
        # tree and checks ties on every call, a measurable part of a small model's step.
        if self._slots is None:
            self._slots = _tensor_slots(self.module)
        for slots, attr, name, is_param, _ in self._slots:
            slots[attr] = params[name] if is_param else buffers[name]

    def _unbind(self) -> None:
        for slots, attr, _, _, skeleton in self._slots or ():
            slots[attr] = skeleton

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuleApply) and self._signature == other._signature

    def __hash__(self) -> int:
        return hash(self._signature)

    def __repr__(self) -> str:
        return f"ModuleApply({type(self.module).__name__})"


class _Holding:
    """:meth:`ModuleApply.hold`'s context (a class: a generator's context costs more, every eager step)."""

    __slots__ = ("apply",)

    def __init__(self, apply: ModuleApply):
        self.apply = apply

    def __enter__(self) -> None:
        self.apply._holding += 1

    def __exit__(self, *exc: object) -> None:
        self.apply._holding -= 1
        if not self.apply._holding:
            self.apply._unbind()


class BoundApply:
    """A :class:`ModuleApply` bound to a step's key: what a step hands its ``loss_fn`` as ``apply``.

    A call without ``key=`` gets the step's key (the n-th such call ``fold_in(key, n)``), so a
    forgotten ``key=key`` still draws keyed masks, the same as passing it, never torch's global
    RNG (which would differ between compiled and eager, and after a resume). With
    ``record_updates`` it notes which buffers a forward wrote (their version counter moved from
    the fresh clone's 0), so the step can check that the ``loss_fn`` returned them.

    Example:
        >>> import torch, ftrain
        >>> dropout = ModuleApply(torch.nn.Dropout(0.5))
        >>> forgot, _ = BoundApply(dropout, ftrain.random.key(0))({}, {}, torch.ones(8))
        >>> keyed, _ = dropout({}, {}, torch.ones(8), key=ftrain.random.key(0))
        >>> bool(torch.equal(forgot, keyed))
        True
    """

    def __init__(self, apply: ModuleApply, key: torch.Tensor, *, record_updates: bool = False):
        self.apply = apply
        self.key = key
        self.record_updates = record_updates
        self.updated: set[str] = set()
        self._unkeyed = 0

    @property
    def module(self) -> nn.Module:
        """The wrapped module skeleton."""
        return self.apply.module

    def __call__(
        self, params: dict, buffers: dict, *args: Any, key: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[Any, dict]:
        """``apply(params, buffers, *args, key=key)``, with the step's key when ``key`` is not given."""
        if key is None:
            key = self.key if self._unkeyed == 0 else random.fold_in(self.key, self._unkeyed)
            self._unkeyed += 1
        out, new_buffers = self.apply(params, buffers, *args, key=key, **kwargs)
        if self.record_updates:
            self.updated.update(name for name, b in new_buffers.items() if b._version > 0)
        return out, new_buffers


def trainable(apply: Any, params: dict) -> dict:
    """The params a step differentiates and an optimizer updates: all but ``apply``'s frozen ones.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> _ = net.bias.requires_grad_(False)
        >>> params, _ = extract(net)
        >>> sorted(trainable(ModuleApply(net), params))
        ['weight']
    """
    frozen = getattr(apply, "frozen", None)
    return {k: v for k, v in params.items() if k not in frozen} if frozen else params


def _tensor_slots(module: nn.Module) -> list[tuple[dict, str, str, bool, torch.Tensor]]:
    """``(owner's _parameters or _buffers, attr, state name, is_param, skeleton tensor)`` for every
    tensor under every name (a tied tensor's second name gets the first name's state tensor)."""
    first: dict[int, str] = {}
    slots = []
    for is_param, named in (
        (True, module.named_parameters(remove_duplicate=False)),
        (False, module.named_buffers(remove_duplicate=False)),
    ):
        for name, t in named:
            owner, attr = _owner(module, name)
            slots.append(
                (owner._parameters if is_param else owner._buffers, attr, first.setdefault(id(t), name), is_param, t)
            )
    return slots


def _has_dropout(module: nn.Module) -> bool:
    """Does ``module`` hold a dropout module or a dropout rate attribute (transformers' attention_dropout)?"""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return True
        if any("drop" in k.lower() and isinstance(v, float) and v > 0 for k, v in vars(sub).items()):
            return True
    return False


def to_module(apply: ModuleApply, params: dict, buffers: dict) -> nn.Module:
    """A fresh real module holding ``params`` and ``buffers`` (cloned; the state is untouched).

    Use it to export a trained state (``torch.export``, ONNX) or to run it as a
    plain PyTorch module.
    """
    if not isinstance(apply, ModuleApply):
        raise TypeError(f"to_module needs a state whose apply_fn is a ModuleApply, got {type(apply).__name__}")
    module = copy.deepcopy(apply.module)
    expected = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    given = set(params) | set(buffers)
    if expected != given:
        raise ValueError(
            f"the state's tensors do not match {type(module).__name__}: missing {sorted(expected - given)}, "
            f"unexpected {sorted(given - expected)}"
        )
    # Rebuild by identity so that tied tensors (one Parameter under two names) stay tied.
    fresh = {
        id(p): nn.Parameter(params[n].detach().clone(), requires_grad=p.requires_grad)  # (frozen stays frozen)
        for n, p in module.named_parameters()
    }
    fresh.update({id(b): buffers[n].detach().clone() for n, b in module.named_buffers()})
    for name, p in module.named_parameters(remove_duplicate=False):
        owner, attr = _owner(module, name)
        owner._parameters[attr] = fresh[id(p)]
    for name, b in module.named_buffers(remove_duplicate=False):
        owner, attr = _owner(module, name)
        owner._buffers[attr] = fresh[id(b)]
    return module


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), attr
