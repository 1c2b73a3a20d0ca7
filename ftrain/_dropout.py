"""Key-driven dropout for pure forwards: the same key gives the same masks, compiled or eager.

``torch.nn.Dropout`` calls ``torch.nn.functional.dropout``, which draws from the global RNG. No
RNG API works inside a ``fullgraph`` compiled region, and compiled native dropout draws different
masks than eager. :class:`KeyedRandomness` is a ``TorchFunctionMode`` that reroutes the dropout
functions to a counter-based mask built on :mod:`ftrain.random` while it is active; dynamo traces
the mode, so the whole step is still one graph. Any other global-RNG call inside the mode raises:
a pure step must not depend on (or advance) hidden state.

Example:
    >>> import torch, ftrain
    >>> x = torch.ones(4, 8)
    >>> with KeyedRandomness(ftrain.random.key(0)):
    ...     a = torch.nn.functional.dropout(x, 0.5)
    >>> with KeyedRandomness(ftrain.random.key(0)):
    ...     b = torch.nn.functional.dropout(x, 0.5)
    >>> bool(torch.equal(a, b))
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

from . import random

__all__ = ["KeyedRandomness"]

_GLOBAL_RNG = {
    torch.rand,
    torch.randn,
    torch.randint,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.multinomial,
    torch.poisson,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.bernoulli_,
    torch.Tensor.random_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.cauchy_,
    torch.Tensor.log_normal_,
    torch.Tensor.bernoulli,
    torch.Tensor.multinomial,
}


CHECKPOINTED_DROPOUT = (
    "dropout inside an activation-checkpointed segment is not supported: torch recomputes the segment in the "
    "backward, and there (eagerly) draws other masks than the forward's, or (compiled) refuses random ops in a "
    "recomputed region. Keep dropout out of checkpointed segments (set their dropout to 0; dropout elsewhere is fine)"
)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


class KeyedRandomness(TorchFunctionMode):
    """Within this context, dropout draws its masks from ``key`` instead of the global RNG.

    Each dropout call gets its own key, ``fold_in(key, n)`` for the n-th call, so two layers
    never share a mask and a rerun with the same key draws the same masks. Handled:
    ``F.dropout``, ``F.dropout1d/2d/3d`` (whole channels) and
    ``F.scaled_dot_product_attention(dropout_p>0)`` (written out so its attention dropout is
    keyed too). Other global-RNG functions raise a ``RuntimeError`` naming the function.

    Example:
        >>> import torch, ftrain
        >>> with KeyedRandomness(ftrain.random.key(1)):
        ...     y = torch.nn.functional.dropout(torch.ones(3), 0.0)
        >>> y
        tensor([1., 1., 1.])
    """

    def __init__(self, key: torch.Tensor):
        super().__init__()
        self.key = key
        self.calls = 0

    def _next_key(self) -> torch.Tensor:
        k = random.fold_in(self.key, self.calls)
        self.calls += 1
        return k

    def _mask(self, x: torch.Tensor, p: float, shape: tuple[int, ...]) -> torch.Tensor:
        # (Checked eagerly: compiled, torch refuses the recompute itself and the step reports this eager error.)
        if not (torch.compiler.is_compiling() or isinstance(x, FakeTensor)) and _in_checkpointed_segment():
            raise RuntimeError(CHECKPOINTED_DROPOUT)
        keep = random.bernoulli(self._next_key(), 1.0 - p, shape, device=x.device)
        return keep.to(x.dtype) * (1.0 / (1.0 - p))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
            if not _arg(args, kwargs, 2, "training", True) or p == 0:
                return x
            if p == 1:
                return x * 0
            return x * self._mask(x, p, tuple(x.shape))
        if func in (F.dropout1d, F.dropout2d, F.dropout3d):
            x, p = args[0], _arg(args, kwargs, 1, "p", 0.5)
            if not _arg(args, kwargs, 2, "training", True) or p == 0:
                return x
            spatial = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}[func]
            # One draw per (sample, channel); an unbatched input has no sample dim.
            lead = tuple(x.shape[: x.dim() - spatial])
            return x * self._mask(x, p, lead + (1,) * spatial)
        if func is F.scaled_dot_product_attention and _arg(args, kwargs, 5, "dropout_p", 0.0) > 0:
            return self._attention(args, kwargs)
        if func in _GLOBAL_RNG:
            raise RuntimeError(
                f"{getattr(func, '__qualname__', func)} draws from torch's global RNG inside a keyed, pure forward; "
                "draw from the key instead (ftrain.random.uniform/normal/bernoulli with a key passed to the model), "
                "or call the model without key= to use the global RNG"
            )
        return func(*args, **kwargs)

    def _attention(self, args: tuple, kwargs: dict) -> torch.Tensor:
        q, k, v = args[0], args[1], args[2]
        attn_mask = _arg(args, kwargs, 3, "attn_mask", None)
        p = _arg(args, kwargs, 5, "dropout_p", 0.0)
        is_causal = _arg(args, kwargs, 6, "is_causal", False)
        scale = _arg(args, kwargs, 7, "scale", None)
        if _arg(args, kwargs, 8, "enable_gqa", False):  # grouped-query attention (Llama): each k/v head serves a group
            group = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = (q @ k.transpose(-2, -1)) * scale
        if is_causal:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        weights = torch.softmax(scores, dim=-1)
        return (weights * self._mask(weights, p, tuple(weights.shape))) @ v


def _in_checkpointed_segment() -> bool:
    # torch.utils.checkpoint (non-reentrant) runs its segment under its own saved-tensor hooks.
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"
