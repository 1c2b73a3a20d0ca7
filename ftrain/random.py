"""Explicit random keys, in the manner of ``jax.random``.

A key is a small ``int64`` tensor of shape ``(2,)`` holding two 32-bit words.
Every draw is a pure function of the key: a counter-based hash (integer ops
only), so the same key gives the same numbers on every run, in eager and in
compiled code, and the global torch RNG is never touched or read.

Never reuse a key for two different purposes: :func:`split` it, or
:func:`fold_in` a distinguishing integer (such as the step).

Example:
    >>> from ftrain import random
    >>> k = random.key(0)
    >>> k_init, k_dropout = random.split(k)
    >>> x = random.normal(k_init, (3,))
    >>> bool((x == random.normal(k_init, (3,))).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import tree

__all__ = ["bernoulli", "bits", "check_key", "fold_in", "is_key", "key", "normal", "randint", "split", "uniform"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_FOLD_SALT = 0x68E31DA4  # fold_in xors it into the key's second word


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons) on 32-bit values held in int64. Products of two 32-bit
    # numbers wrap modulo 2**64, so masking back to 32 bits gives the exact unsigned result.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _hash32((_hash32(a) + ((b * _GOLDEN) & _MASK32) + 1) & _MASK32)


def _hash32_host(x: int) -> int:
    # _hash32 on a Python int: the same bits for every int64 input (Python's shifts and xors act on
    # two's complement like torch's, and the exact products agree with int64's modulo 2**32).
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix_host(a: int, b: int) -> int:
    return _hash32_host((_hash32_host(a) + ((b * _GOLDEN) & _MASK32) + 1) & _MASK32)


def key(seed: int) -> torch.Tensor:
    """A new key from an integer seed (any Python int, negative or > 2**32 included).

    >>> key(0).shape, key(0).dtype
    (torch.Size([2]), torch.int64)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random.key expects a Python int seed, got {type(seed).__name__} {seed!r}")
    seed %= 2**64
    words = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)
    return torch.stack([_mix(words[0], words[1]), _mix(words[1], words[0] ^ 0x5BD1E995)])


def is_key(obj: object) -> bool:
    """True if ``obj`` is a key (or a batch of keys: shape ``(..., 2)``, dtype int64)."""
    return isinstance(obj, torch.Tensor) and obj.dtype == torch.int64 and obj.dim() >= 1 and obj.shape[-1] == 2


def check_key(k: object, who: str) -> torch.Tensor:
    """``k`` if it is one key (int64, shape ``(2,)``); else a TypeError naming ``who`` and what it got.

    For functions that take a key from their caller, so a wrong one fails where it was passed.

    >>> check_key(key(0), "my_init").shape
    torch.Size([2])
    >>> check_key(3, "my_init")
    Traceback (most recent call last):
    TypeError: my_init expects a key made by ftrain.random.key(seed) (int64 tensor of shape (2,)), got 3
    """
    if not (isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.shape == (2,)):
        got = f"a tensor of shape {tuple(k.shape)} and dtype {k.dtype}" if isinstance(k, torch.Tensor) else repr(k)
        raise TypeError(f"{who} expects a key made by ftrain.random.key(seed) (int64 tensor of shape (2,)), got {got}")
    return k


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` new independent keys from ``k``, stacked into shape ``(num, 2)``.

    Unpack them like a tuple: ``k1, k2 = split(k)``.
    """
    check_key(k, "random.split")
    i = torch.arange(num, dtype=torch.int64, device=k.device)
    return torch.stack([_mix(_mix(k[0], i), k[1]), _mix(_mix(k[1], i ^ 0x2545F491), k[0])], dim=-1)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``k`` and an integer (a Python int or an integer tensor such as the step).

    ``fold_in(k, step)`` gives every step its own key without storing one per step.
    """
    check_key(k, "random.fold_in")
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.dtype.is_complex or data.numel() != 1:
            raise TypeError(
                f"random.fold_in expects an integer scalar, got a tensor of shape {tuple(data.shape)} and dtype {data.dtype}"
            )
        if tree.host_readable(k, data):
            return _fold_in_host(k, int(data.to(torch.int64)))
        d = data.reshape(()).to(torch.int64).to(k.device) & _MASK32
    elif isinstance(data, int) and not isinstance(data, bool):
        if tree.host_readable(k):
            return _fold_in_host(k, data)
        d = torch.tensor(data & _MASK32, dtype=torch.int64, device=k.device)
    else:
        raise TypeError(f"random.fold_in expects an integer scalar, got {type(data).__name__} {data!r}")
    if torch.compiler.is_compiling():
        # Word by word: 0-d ops become scalar code, where the two-element form below would cost
        # inductor a vectorized int64 kernel and seconds more of C++ compile.
        return torch.stack([_mix(k[0], d), _mix(k[1] ^ _FOLD_SALT, d)])
    # Eager: both words in one pass, [mix(k0, d), mix(k1 ^ salt, d)] elementwise (half the kernels).
    salt = torch.tensor([0, _FOLD_SALT], dtype=torch.int64, device=k.device)
    return _mix(k ^ salt, d)


def _fold_in_host(k: torch.Tensor, data: int) -> torch.Tensor:
    """:func:`fold_in` of a CPU key, computed in Python: the same bits as the some 40 tiny tensor ops,
    which cost a tenth of a small model's eager step."""
    k0, k1 = k.tolist()
    d = data & _MASK32
    return torch.tensor([_mix_host(k0, d), _mix_host(k1 ^ _FOLD_SALT, d)], dtype=torch.int64)


def bits(k: torch.Tensor, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform random 32-bit words (as int64 in ``[0, 2**32)``) of the given shape."""
    check_key(k, "random.bits")
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    counter = torch.arange(n, dtype=torch.int64, device=device if device is not None else k.device)
    k = k.to(counter.device)
    return _mix(_mix(counter, k[0]), k[1]).reshape(shape)


def uniform(
    k: torch.Tensor,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform floats in ``[low, high)`` (24 random bits of mantissa)."""
    u = (bits(k, shape, device) >> 8).to(torch.float32) * (2.0**-24)
    return (low + (high - low) * u).to(dtype)


def normal(
    k: torch.Tensor,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal floats (Box-Muller over two independent uniform draws)."""
    k1, k2 = split(k)
    u1 = 1.0 - uniform(k1, shape, device=device)  # in (0, 1]: log is finite
    u2 = uniform(k2, shape, device=device)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * torch.pi) * u2)).to(dtype)


def bernoulli(
    k: torch.Tensor, p: float | torch.Tensor = 0.5, shape: Sequence[int] = (), device: torch.device | str | None = None
) -> torch.Tensor:
    """Booleans that are ``True`` with probability ``p``."""
    return uniform(k, shape, device=device) < p


def randint(
    k: torch.Tensor, low: int, high: int, shape: Sequence[int] = (), device: torch.device | str | None = None
) -> torch.Tensor:
    """Integers in ``[low, high)`` (int64). For ``high - low`` far below ``2**32`` the bias is negligible."""
    if high <= low:
        raise ValueError(f"random.randint needs low < high, got low={low}, high={high}")
    return low + bits(k, shape, device) % (high - low)
