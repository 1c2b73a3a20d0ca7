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

import array
import math
import struct
from collections.abc import Sequence

import torch

from . import tree

__all__ = ["bernoulli", "bits", "check_key", "fold_in", "is_key", "key", "normal", "randint", "split", "uniform"]

_MASK32 = 0xFFFFFFFF
_MASK64 = 2**64 - 1
# SplitMix64's increment and multipliers, as the int64 values of their 64 bits.
_GOLDEN64 = 0x9E3779B97F4A7C15 - 2**64
_MIX64_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX64_2 = 0x94D049BB133111EB - 2**64
_INT64_MIN = -(2**63)
# A key's two words are one 64-bit seed; word i of its stream is mix64((seed + i) * golden), the
# SplitMix64 sequence of seed * golden. Draws read the stream from position 0; derived keys are
# stream words far beyond any draw. (Adding the position before the product, not after it, keeps
# the counters out of inductor's index arithmetic, where i * golden overflows its int64 bounds.)
_FOLD_AT = 2**62  # fold_in(k, d) is the word at _FOLD_AT + d
_SPLIT_AT = -(2**63)  # split(k)[i] at 2**63 + i


def _mix64(z: torch.Tensor) -> torch.Tensor:
    # SplitMix64's finalizer (Steele, Lea and Flood, 2014). Products wrap modulo 2**64 in int64
    # (two's complement): the unsigned arithmetic it needs.
    z = (z ^ _lsr(z, 30)) * _MIX64_1
    z = (z ^ _lsr(z, 27)) * _MIX64_2
    return z ^ _lsr(z, 31)


def _lsr(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64_host(z: int) -> int:
    # _mix64 on a Python int in [0, 2**64): the same 64 bits.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _seed(k: torch.Tensor) -> torch.Tensor:
    return (k[0] << 32) | k[1]


def _words(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([_lsr(z, 32), z & _MASK32], dim=-1)


def key(seed: int) -> torch.Tensor:
    """A new key from an integer seed (any Python int, negative or > 2**32 included).

    Seeds equal modulo ``2**64`` give the same key; others never do.

    >>> key(0).shape, key(0).dtype
    (torch.Size([2]), torch.int64)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random.key expects a Python int seed, got {type(seed).__name__} {seed!r}")
    z = _mix64_host((_mix64_host(seed & _MASK64) + _GOLDEN64) & _MASK64)  # (a bijection of the 64-bit seed)
    return torch.tensor([z >> 32, z & _MASK32], dtype=torch.int64)


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
    return _words(_mix64((i + (_seed(k) + _SPLIT_AT)) * _GOLDEN64))


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
            return _fold_in_host(k, int(data) if data.dtype == torch.int64 else int(data.to(torch.int64)))
        d = data.reshape(()).to(torch.int64).to(k.device)
    elif isinstance(data, int) and not isinstance(data, bool):
        if tree.host_readable(k):
            return _fold_in_host(k, data)
        d = torch.full((), _signed64(data), dtype=torch.int64, device=k.device)
    else:
        raise TypeError(f"random.fold_in expects an integer scalar, got {type(data).__name__} {data!r}")
    return _words(_mix64((d + (_seed(k) + _FOLD_AT)) * _GOLDEN64))


def _fold_in_host(k: torch.Tensor, data: int) -> torch.Tensor:
    """:func:`fold_in` of a CPU key, computed in Python: the same bits as the some 20 tiny tensor ops,
    which cost a tenth of a small model's eager step."""
    k0, k1 = k.tolist()
    z = _mix64_host(((((k0 << 32) | k1) + _FOLD_AT + data) * _GOLDEN64) & _MASK64)
    # (Over a fresh int64 array, which the tensor alone keeps: a third of torch.tensor's cost from a list.)
    return torch.frombuffer(array.array("q", (z >> 32, z & _MASK32)), dtype=torch.int64)


def _signed64(x: int) -> int:
    """``x`` modulo ``2**64`` as an int64 value."""
    x &= _MASK64
    return x - 2**64 if x >> 63 else x


def bits(k: torch.Tensor, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform random 32-bit words (as int64 in ``[0, 2**32)``) of the given shape."""
    return _lsr(_stream(k, shape, device, "random.bits"), 32)


def _stream(k: torch.Tensor, shape: Sequence[int], device: torch.device | str | None, who: str) -> torch.Tensor:
    # The key's stream from position 0: one 64-bit hash per element, a dozen elementwise int64 ops
    # (cheap eagerly, and little for inductor to lower: a dropout mask per layer per step).
    check_key(k, who)
    shape = tuple(shape)
    counter = torch.arange(math.prod(shape), dtype=torch.int64, device=device if device is not None else k.device)
    k = k.to(counter.device)
    return _mix64((counter + _seed(k)) * _GOLDEN64).reshape(shape)


def uniform(
    k: torch.Tensor,
    shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform floats in ``[low, high)`` (24 random bits of mantissa)."""
    u = _lsr(_stream(k, shape, device, "random.uniform"), 40).to(torch.float32) * (2.0**-24)
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
    """Booleans that are ``True`` with probability ``p``: exactly ``uniform(k, shape) < p``."""
    if isinstance(p, torch.Tensor):
        return uniform(k, shape, device=device) < p
    # uniform < p, as torch compares (p rounded to float32), is top24 < ceil(p * 2**24) on the
    # stream's top 24 bits, and that is one signed compare of the 64-bit words with their sign bit
    # flipped: four elementwise ops fewer (dropout draws a mask per layer per step).
    p32 = struct.unpack("f", struct.pack("f", p))[0]
    z = _stream(k, shape, device, "random.bernoulli")
    if p32 >= 1:  # (the threshold below would need 2**64)
        return torch.ones_like(z, dtype=torch.bool)
    top24 = math.ceil(p32 * 2**24) if p32 > 0 else 0  # (NaN: never True, as uniform < NaN)
    return (z ^ _INT64_MIN) < (top24 << 40) + _INT64_MIN


def randint(
    k: torch.Tensor, low: int, high: int, shape: Sequence[int] = (), device: torch.device | str | None = None
) -> torch.Tensor:
    """Integers in ``[low, high)`` (int64). For ``high - low`` far below ``2**32`` the bias is negligible."""
    if high <= low:
        raise ValueError(f"random.randint needs low < high, got low={low}, high={high}")
    return low + bits(k, shape, device) % (high - low)
