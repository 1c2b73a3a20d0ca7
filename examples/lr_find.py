"""Find a learning rate for the digits MLP with `ftrain.lr_find`.

The sweep trains one step at each learning rate, exponentially spaced from --min-lr to
--max-lr, and suggests the one where the (smoothed) loss falls fastest. Because steps are
pure, the sweep starts from the initial state and leaves it untouched: there is no "restore the
model afterwards", and the same state and step go straight into `fit` with the suggestion.

The learning rate must be a tensor in the optimizer's state for the sweep to change it
without recompiling: build the optimizer with `optim.inject_hyperparams`.

    python examples/lr_find.py
    python examples/lr_find.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--num-steps", type=int, default=100, help="learning rates tried")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=300, help="then train this long with the suggestion")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a short sweep, eager")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_steps, args.train_steps, args.no_compile = 8, 3, True
    torch.manual_seed(0)

    train, val = ftrain.datasets.digits("train"), ftrain.datasets.digits("val")
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=1e-2)
    state = ftrain.TrainState.create(model, tx, key=ftrain.random.key(0))
    train_step = ftrain.make_train_step(loss_fn, compile=not args.no_compile)
    loader = ftrain.data.Loader(train, args.batch_size, seed=0)

    result = ftrain.lr_find(state, train_step, loader, min_lr=args.min_lr, max_lr=args.max_lr, num_steps=args.num_steps)
    print("     lr      smoothed loss")
    for lr, loss in list(zip(result.lrs, result.losses))[:: max(1, len(result.lrs) // 15)]:
        print(f"  {lr:9.2e}   {loss:.4f}")
    print(f"suggested learning rate: {result.suggestion:.2e} (the state is untouched: step {int(state.step)})")

    # Train with it: the learning rate is a tensor in the optimizer state, so set it there.
    state = state.replace(opt_state=optim.set_hyperparams(state.opt_state, learning_rate=result.suggestion))
    state = ftrain.fit(state, train_step, loader, num_steps=args.train_steps, log=ftrain.writers.Console())
    acc = ftrain.evaluate(state, ftrain.make_eval_step(loss_fn, compile=False), [val.tensors])["acc"]
    print(f"after {args.train_steps} steps at the suggested rate: val accuracy {acc:.2%}")
    return result.suggestion


if __name__ == "__main__":
    main()
