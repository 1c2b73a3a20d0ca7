"""Optimizer update cost: ftrain.optim (eager and compiled) against torch.optim.AdamW, side by side.

One "update" is clip-by-global-norm(1.0) + AdamW(lr schedule-free 1e-3, wd 0.01) over a
model-shaped dict of float32 tensors, gradients given. torch variants update in place
(``foreach=False`` is torch's CPU default, ``foreach=True``, ``fused=True``); ftrain's update is
pure (new tensors out), eager or inside one ``torch.compile(fullgraph=True)`` region with the
learning rate as a tensor in the state (``inject_hyperparams``). Prints the median time per
update and the ratio to torch's default, all measured in the same run.

    python benchmarks/optim_update.py [--width 1024] [--iters 40] [--threads 2]

``--eager-step`` measures instead the optimizer half of an eager (``compile=False``) train step:
AdamW(1e-3, wd 0.01) alone, on the digits MLP's params (64-128-256-10) and on the model above.
``torch.optim.AdamW(foreach=True)``'s ``step()`` against ftrain's ``optim.record(state.apply_gradients,
...)`` as the step calls it, fused (``TrainState.apply_gradients`` in torch.optim's kernels) and
through the chain (``tx.update`` then ``apply_updates``: what it ran before the fused path),
interleaved in rounds; medians over rounds of the time per update and of each round's ratio.

    python benchmarks/optim_update.py --eager-step [--rounds 30] [--iters 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ftrain import TrainState, optim, random, tree


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


def mlp_params() -> dict[str, torch.Tensor]:
    """The digits example's 64-128-256-10 MLP."""
    g = torch.Generator().manual_seed(0)
    sizes = [64, 128, 256, 10]
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        params[f"{2 * i}.weight"] = torch.randn(n_out, n_in, generator=g) * 0.05
        params[f"{2 * i}.bias"] = torch.zeros(n_out)
    return params


def eager_step_variants(params, grads):
    """The optimizer half of an eager step three ways, each a function doing one update."""
    tx = optim.adamw(1e-3, weight_decay=0.01)

    def ftrain_variant_of(t):
        box = {}
        step = torch.zeros((), dtype=torch.int64)
        box["s"] = TrainState(step, dict(params), {}, t.init(params), random.key(0), apply_fn=None, tx=t)

        def step_fn():
            box["s"], _ = optim.record(box["s"].apply_gradients, grads, gradients=grads)

        return step_fn

    def torch_only():
        opt = torch.optim.AdamW(
            [p.clone().requires_grad_(True) for p in params.values()], lr=1e-3, weight_decay=0.01, foreach=True
        )
        for p, g in zip(opt.param_groups[0]["params"], grads.values()):
            p.grad = g.clone()
        return opt.step

    return {
        "torch AdamW (foreach=True) step()": torch_only(),
        "ftrain apply_gradients, fused": ftrain_variant_of(tx),
        "ftrain apply_gradients, chain": ftrain_variant_of(tx._replace(fused_apply=None)),
    }


def eager_step(args) -> None:
    for label, params in [("digits MLP 64-128-256-10", mlp_params()), (f"width {args.width}", make_params(args.width))]:
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        variants = eager_step_variants(params, grads)
        times = {name: [] for name in variants}
        with torch.no_grad():
            for _ in range(args.rounds):  # round robin, so a change of load hits each alike
                for name, fn in variants.items():
                    times[name].append(median_ms(fn, args.iters, warmup=2))
        base = "torch AdamW (foreach=True) step()"
        n = sum(p.numel() for p in params.values())
        print(f"AdamW, {label} ({n:,} float32 params), {args.threads} threads, median of {args.rounds} rounds")
        for name, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(times[base], ts))
            print(f"  {name:36s} {statistics.median(ts) * 1e3:8.1f} us   x{ratio:4.2f} speed vs torch foreach")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager-step", action="store_true", help="the optimizer half of an eager train step")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.eager_step:
        eager_step(args)
        return
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
