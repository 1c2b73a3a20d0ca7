"""Optimizer update cost: ftrain.optim (eager and compiled) against torch.optim.AdamW, side by side.

One "update" is clip-by-global-norm(1.0) + AdamW(lr schedule-free 1e-3, wd 0.01) over a
model-shaped dict of float32 tensors, gradients given. torch variants update in place
(``foreach=False`` is torch's CPU default, ``foreach=True``, ``fused=True``); ftrain's update is
pure (new tensors out), eager or inside one ``torch.compile(fullgraph=True)`` region with the
learning rate as a tensor in the state (``inject_hyperparams``). Prints the median time per
update and the ratio to torch's default, all measured in the same run.

    python benchmarks/optim_update.py [--width 1024] [--iters 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ftrain import optim, tree


def make_params(width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "embed": (width * 4, width // 4),
        "fc1.weight": (width, width),
        "fc1.bias": (width,),
        "fc2.weight": (width, width),
        "fc2.bias": (width,),
        "norm.weight": (width,),
        "head.weight": (10, width),
        "head.bias": (10,),
    }
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_variant(params, grads, **kwargs):
    ps = [p.clone().requires_grad_(True) for p in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.clone()
    opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kwargs)

    def step():
        torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=kwargs.get("foreach", False) or None)
        opt.step()

    return step


def ftrain_variant(params, grads, compiled: bool, donate: bool = False):
    tx = optim.chain(
        optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.01)
    )

    def update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optim.apply_updates(p, updates), s

    def update_into_inputs(p, s, g):
        # What a donated step does: the new values are written into the old storage inside the
        # compiled region, so no fresh buffers are allocated (and page-faulted) every step.
        new = update(p, s, g)
        tree.map(lambda old, value: old.copy_(value), (p, s), new)
        return p, s

    body = update_into_inputs if donate else update
    fn = torch.compile(body, fullgraph=True) if compiled else body
    box = {"p": {k: v.clone() for k, v in params.items()}}
    box["s"] = tx.init(box["p"])

    def step():
        box["p"], box["s"] = fn(box["p"], box["s"], grads)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = make_params(args.width)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    n = sum(p.numel() for p in params.values())
    variants = {
        "torch AdamW (foreach=False, CPU default)": torch_variant(params, grads, foreach=False),
        "torch AdamW (foreach=True)": torch_variant(params, grads, foreach=True),
        "torch AdamW (fused=True)": torch_variant(params, grads, fused=True),
        "ftrain adamw, eager (pure)": ftrain_variant(params, grads, compiled=False),
        "ftrain adamw, compiled (pure)": ftrain_variant(params, grads, compiled=True),
        "ftrain adamw, compiled, written into inputs": ftrain_variant(params, grads, compiled=True, donate=True),
    }
    with torch.no_grad():
        results = {name: median_ms(step, args.iters) for name, step in variants.items()}
    base = results["torch AdamW (foreach=False, CPU default)"]
    print(
        f"clip_by_global_norm + AdamW update, {n / 1e6:.1f}M float32 params, {args.threads} threads, "
        f"median of {args.iters}"
    )
    for name, ms in results.items():
        print(f"  {name:42s} {ms:8.2f} ms   x{base / ms:4.2f} speed vs torch default")


if __name__ == "__main__":
    main()
