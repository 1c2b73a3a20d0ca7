"""A tiny step for the compiled-step cache tests, run in this process or as a fresh one.

    python tests/cache_worker.py OUT.pt          # FTRAIN_CACHE_DIR says where the cache is

trains a few steps with ``make_train_step(loss_fn).donate`` (the cache is on by default) and
saves the final params, ``num_compiles`` (compiles in this process: 0 when the step was served
from the cache) and whether the compiler (dynamo, inductor) was imported.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain._step._cache import cache_dir

SCALE = 1.0  # a global constant the loss reads: part of the cache key
STEPS = 3


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return SCALE * F.cross_entropy(logits, y), {}, buffers


def build(width: int = 16, lr: float = 1e-2, dtype: torch.dtype = torch.float32, batch_size: int = 4):
    """``(state, batches)``: the same state and data in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)).to(dtype)
    state = ftrain.TrainState.create(model, ftrain.optim.adamw(lr), key=ftrain.random.key(0))
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch_size, 8, generator=g, dtype=dtype), torch.randint(0, 3, (batch_size,), generator=g))
        for _ in range(STEPS)
    ]
    return state, batches


def train():
    """Train through the cache in the form ``fit`` runs (donating); ``(final params, the train step)``."""
    state, batches = build()
    train_step = ftrain.make_train_step(loss_fn)
    for batch in batches:
        state, _ = train_step.donate(state, batch)
    return state.params, train_step


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    """An empty step cache, for a test that counts compiles: a warm one would serve its steps.

    Inductor's kernels stay shared (a link to the real cache's), so the compile stays cheap.
    """
    root = tmp_path / "ftrain-cache"
    root.mkdir()
    shared = cache_dir() / "inductor"
    shared.mkdir(parents=True, exist_ok=True)
    (root / "inductor").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(root))
    return root


def main(out: str) -> None:
    torch.set_num_threads(2)  # as in conftest: inductor's CPU kernels specialize on it
    params, step = train()
    # (A step served from the cache needs no compiler: neither is imported.)
    loaded = {name: name in sys.modules for name in ("torch._dynamo", "torch._inductor")}
    torch.save({"params": params, "compiles": step.num_compiles, "imported": loaded}, out)


if __name__ == "__main__":
    # Run from the module, not from __main__: the loss's module name is part of the key, and the
    # tests import this file as `cache_worker`.
    import cache_worker

    cache_worker.main(sys.argv[1])
