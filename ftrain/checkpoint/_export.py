"""Weights out of a training state: a plain state dict and safetensors files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["load_safetensors", "save_safetensors", "state_dict"]


def state_dict(state: Any, *, buffers: bool = True) -> dict[str, torch.Tensor]:
    """The params (and buffers) of ``state`` as a plain ``nn.Module``-style state dict.

    Keys are the module's dotted names, so ``model.load_state_dict(...)`` takes
    it (the tensors are shared with the state, not copied).

    >>> import torch, ftrain
    >>> state = ftrain.TrainState.create(torch.nn.BatchNorm1d(2), ftrain.optim.sgd(0.1))
    >>> sorted(ftrain.checkpoint.state_dict(state))
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    >>> torch.nn.BatchNorm1d(2).load_state_dict(ftrain.checkpoint.state_dict(state))
    <All keys matched successfully>
    """
    params, bufs = getattr(state, "params", None), getattr(state, "buffers", None)
    if not isinstance(params, Mapping):
        raise TypeError(
            f"state_dict expects a TrainState (with a params dict), got {type(state).__name__}; for a plain dict "
            "of tensors use it as is"
        )
    out = dict(params)
    if buffers and isinstance(bufs, Mapping):
        clash = sorted(set(out) & set(bufs))
        if clash:
            raise ValueError(f"state_dict: names {clash} are both params and buffers; cannot merge them into one dict")
        out.update(bufs)
    return {k: v.detach() for k, v in out.items()}


def save_safetensors(
    state: Any, path: str | os.PathLike, *, buffers: bool = True, metadata: Mapping[str, str] | None = None
) -> None:
    """Write the params (and buffers) of ``state`` (or a dict of tensors) to a ``.safetensors`` file.

    The file loads anywhere safetensors does (``safetensors.torch.load_file``,
    Hugging Face tools) with no ftrain or pickle involved. Needs the
    ``safetensors`` package (``pip install ftrain[export]``).

    >>> import tempfile, os, torch, ftrain
    >>> state = ftrain.TrainState.create(torch.nn.Linear(2, 1), ftrain.optim.sgd(0.1))
    >>> f = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> ftrain.checkpoint.save_safetensors(state, f)
    >>> sorted(ftrain.checkpoint.load_safetensors(f))
    ['bias', 'weight']
    """
    tensors = dict(state) if isinstance(state, Mapping) else state_dict(state, buffers=buffers)
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_safetensors: {k!r} is a {type(v).__name__}, expected a tensor")
    safetensors_torch = _safetensors()
    # safetensors refuses shared or non-contiguous storage: write independent contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    safetensors_torch.save_file(tensors, os.fspath(path), metadata=dict(metadata) if metadata else None)


def load_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a dict of tensors on ``device``."""
    return _safetensors().load_file(os.fspath(path), device=str(device))


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "save_safetensors/load_safetensors need the safetensors package: pip install safetensors "
            "(or pip install 'ftrain[export]')"
        ) from e
    return safetensors.torch
