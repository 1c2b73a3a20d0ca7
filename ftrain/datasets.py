"""Small real datasets that need no download, for examples, tests and smoke runs.

:func:`digits` is scikit-learn's 8x8 handwritten digits (1,797 images, 10
classes), which ships inside scikit-learn (``pip install scikit-learn``, part of
the ``examples`` and ``test`` extras).

Example:
    >>> from ftrain import datasets
    >>> train = datasets.digits("train")
    >>> x, y = train.tensors
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([1258, 64]), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._validate import check_int, check_one_of

__all__ = ["SPLITS", "digits"]

SPLITS: dict[str, tuple[float, float]] = {"train": (0.0, 0.7), "val": (0.7, 0.85), "test": (0.85, 1.0)}
"""The fixed fractions of the shuffled data in each split: 70% / 15% / 15%."""


@lru_cache(maxsize=4)
def _digits_arrays(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The data file inside scikit-learn, read as ``load_digits`` reads it, without importing
    # scikit-learn itself (seconds of imports for a 1,797-row table).
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # pragma: no cover - depends on the environment
        raise ImportError("datasets.digits needs scikit-learn: pip install 'ftrain[examples]'")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    x = torch.as_tensor(table[:, :-1], dtype=torch.float32)
    y = torch.as_tensor(table[:, -1].astype(np.int64))
    # A fixed permutation from the seed (its own generator: the global RNG is not touched).
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def digits(split: str = "train", *, seed: int = 0, normalize: bool = True) -> TensorDataset:
    """scikit-learn's handwritten digits as a ``TensorDataset`` of ``(x, y)``.

    ``x`` is ``(n, 64)`` float32 (8x8 pixels, flattened), ``y`` int64 labels 0-9.
    The 1,797 images are shuffled once with ``seed`` and cut 70/15/15 into
    ``"train"`` (1,258), ``"val"`` (269) and ``"test"`` (270): the same seed
    always gives the same split. With ``normalize``, every split is standardized
    with the *train* split's per-pixel mean and overall standard deviation (no
    information leaks from val/test).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: the shuffle seed.
        normalize: standardize the pixels (otherwise raw values 0-16).

    Example:
        >>> val = digits("val", seed=0)
        >>> len(val), int(val.tensors[1].max())
        (269, 9)
    """
    check_one_of(split, "split", SPLITS, who="datasets.digits")
    check_int(seed, "seed", who="datasets.digits", low=None)
    x, y = _digits_arrays(seed)
    n = len(y)

    def cut(name: str) -> slice:
        lo, hi = SPLITS[name]
        return slice(round(lo * n), round(hi * n))

    part = cut(split)
    xs = x[part]
    if normalize:
        train_x = x[cut("train")]
        # One overall std, not one per pixel: border pixels that are (almost) always 0 in the
        # train split would otherwise blow up the rare val/test image that has ink there.
        xs = (xs - train_x.mean(0)) / train_x.std()
    return TensorDataset(xs.contiguous(), y[part].clone())
