"""Train an ensemble of MLPs, one per seed, at once: `torch.func.vmap` over a stacked state.

Every member is an ordinary `TrainState`; `ftrain.stack_states` stacks them leaf by leaf into
one state whose tensors have a leading "member" dim, and `ftrain.vmap_step(train_step)`
(`torch.func.vmap` over state and batch) runs the pure step on all members in one call,
compiled as one region. Members differ in their initial
weights, their keys (dropout masks) and the order in which they read the data. At the end the members are
unstacked and evaluated alone and as an ensemble (mean of their probabilities).

    python examples/ensemble.py --members 8
    python examples/ensemble.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim


def make_model(dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8, help="ensemble size (one seed each)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--no-compile", action="store_true", help="run the step eagerly")
    parser.add_argument("--smoke", action="store_true", help="2 members, a few steps, eager")
    args = parser.parse_args(argv)
    if args.smoke:
        args.members, args.epochs, args.no_compile = 2, 1, True

    train, test = ftrain.datasets.digits("train"), ftrain.datasets.digits("test")
    tx = optim.adamw(args.lr, weight_decay=1e-2)
    seeds = range(args.members)
    members = []
    for seed in seeds:
        torch.manual_seed(seed)  # each member's initial weights
        members.append(ftrain.TrainState.create(make_model(args.dropout), tx, key=ftrain.random.key(seed)))
    state = ftrain.stack_states(members)  # every leaf gains a leading "member" dim
    # Each member reads the data in its own order; a step takes one batch per member, stacked.
    loaders = [ftrain.data.Loader(train, args.batch_size, seed=seed) for seed in seeds]

    # vmap_step: torch.func.vmap over the stacked state and batch. Its metrics have a member dim;
    # a step's metrics are scalars, so report each member's loss under its own name.
    members_step = ftrain.vmap_step(ftrain.make_train_step(loss_fn, compile=False))

    def ensemble_step(state, batch):
        state, metrics = members_step(state, batch)
        return state, {"loss": metrics["loss"].mean(), **{f"loss/{i}": loss for i, loss in enumerate(metrics["loss"])}}

    ensemble_step = ftrain.compile_step(ensemble_step, compile=not args.no_compile)  # one graph for all members

    num_steps = 3 if args.smoke else args.epochs * len(loaders[0])
    step = 0
    while step < num_steps:
        for batches in zip(*loaders):
            state, metrics = ensemble_step(state, ftrain.tree.stack(batches))
            step += 1
            if step % max(1, num_steps // 5) == 0 or step == num_steps:
                losses = [f"{float(metrics[f'loss/{i}']):.3f}" for i in seeds]
                print(f"step {step}: loss per member {' '.join(losses)}")
            if step == num_steps:
                break

    x, y = test.tensors
    probs = []
    for i, member in enumerate(ftrain.unstack_state(state)):
        model = member.to_module().eval()
        with torch.no_grad():
            probs.append(F.softmax(model(x), dim=-1))
        print(f"member {i}: test accuracy {(probs[-1].argmax(-1) == y).float().mean():.2%}")
    ensemble_acc = float((torch.stack(probs).mean(0).argmax(-1) == y).float().mean())
    print(f"ensemble of {args.members}: test accuracy {ensemble_acc:.2%}")
    return {"ensemble_acc": ensemble_acc}


if __name__ == "__main__":
    main()
