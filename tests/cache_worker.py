"""A tiny step for the compiled-step cache tests, run in this process or as a fresh one.

    python tests/cache_worker.py OUT.pt          # FTRAIN_CACHE_DIR says where the cache is

trains a few steps through the cache and saves the final params and how the step was served
(``compiles``: dynamo compiles in this process; ``hits``: functions loaded from the cache).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain._step._cache import CachedCompile

SCALE = 1.0  # a global constant the loss reads: part of the cache key
STEPS = 3


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return SCALE * F.cross_entropy(logits, y), {}, buffers


def build(width: int = 16, lr: float = 1e-2, dtype: torch.dtype = torch.float32, batch_size: int = 4):
    """``(core, state, batches)``: the same pure train step, state and data in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)).to(dtype)
    state = ftrain.TrainState.create(model, ftrain.optim.adamw(lr), key=ftrain.random.key(0))
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch_size, 8, generator=g, dtype=dtype), torch.randint(0, 3, (batch_size,), generator=g))
        for _ in range(STEPS)
    ]
    return ftrain.make_train_step(loss_fn, compile=False).core, state, batches


@contextlib.contextmanager
def step_mode():
    """What a compiled step runs under (no autograd recording, deterministic algorithms)."""
    with torch.no_grad():
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(False)


def train(directory=None):
    """Train through the cache; ``(final params, the CachedCompile)``."""
    core, state, batches = build()
    step = CachedCompile(core, directory=directory)
    with step_mode():
        for batch in batches:
            state, _ = step(state, batch)
    return state.params, step


def main(out: str) -> None:
    torch.set_num_threads(2)  # as in conftest: inductor's CPU kernels specialize on it
    params, step = train()
    torch.save({"params": params, "compiles": step.count, "hits": step.hits}, out)


if __name__ == "__main__":
    # Run from the module, not from __main__: the loss's module name is part of the key, and the
    # tests import this file as `cache_worker`.
    import cache_worker

    cache_worker.main(sys.argv[1])
