"""Train an MLP (64 -> 128 -> 256 -> 10) on scikit-learn's 8x8 handwritten digits.

The README's main command: `python examples/digits.py`. It trains with `ftrain.fit`,
evaluates on a validation split as it goes, checkpoints (and resumes: run it twice),
writes TensorBoard logs, and prints the final test accuracy.

    python examples/digits.py                  # full run, about a minute on a 2-core CPU
    python examples/digits.py --smoke          # a few steps into a temp dir (used by the tests)
    python examples/digits.py --config run.yaml --lr 1e-2   # Config's fields from YAML, flags override
    tensorboard --logdir runs/digits           # look at the curves
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules


def make_model(dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(128, 256),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(256, 10),
    )


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)  # dropout masks come from `key`
    # Label smoothing: on this small training set (1,257 images) it is worth about a point of test accuracy.
    loss = F.cross_entropy(logits, y, label_smoothing=0.1)
    return loss, {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


@dataclasses.dataclass
class Config:
    """Train the digits MLP (see the module docstring)."""

    epochs: int = 40
    """training epochs"""
    batch_size: int = 64
    lr: float = 3e-3
    """peak learning rate of the warmup-cosine schedule"""
    weight_decay: float = 1e-2
    dropout: float = 0.2
    seed: int = 0
    out: str = "runs/digits"
    """checkpoints and TensorBoard logs go here"""
    no_compile: bool = False
    """run the steps eagerly (for debugging)"""
    smoke: bool = False
    """a few steps into a temp dir, for CI"""


def main(argv: list[str] | None = None) -> float:
    args = ftrain.config.parse(Config, argv, description=__doc__)
    if args.smoke:
        args = dataclasses.replace(args, epochs=1, out=tempfile.mkdtemp(prefix="ftrain-digits-"))
    torch.manual_seed(args.seed)  # only the initial weights come from torch's RNG; the rest is keyed
    start = time.perf_counter()

    train, val, test = (ftrain.datasets.digits(split, seed=args.seed) for split in ("train", "val", "test"))
    train_loader = ftrain.data.Loader(train, args.batch_size, seed=args.seed)
    num_steps = args.epochs * len(train_loader)
    if args.smoke:
        num_steps = 5

    lr = schedules.warmup_cosine_decay(
        init_value=0.0, peak_value=args.lr, warmup_steps=max(1, num_steps // 20), decay_steps=num_steps
    )
    tx = optim.adamw(lr, weight_decay=args.weight_decay)
    state = ftrain.TrainState.create(make_model(args.dropout), tx, key=ftrain.random.key(args.seed))

    compile = not args.no_compile
    train_step = ftrain.make_train_step(loss_fn, compile=compile)
    # The smoke run compiles the train step only: it is the path worth exercising, and compiles are slow.
    eval_step = ftrain.make_eval_step(loss_fn, compile=compile and not args.smoke)
    # Val and test are small: one batch each, so the eval step compiles for one shape only.
    eval_loader = ftrain.data.Loader(val, len(val), shuffle=False)

    # The run's config goes with every checkpoint (and a directory holding another config's run is
    # refused rather than resumed) and to the writers, as TensorBoard hparams.
    config = {k: v for k, v in ftrain.config.to_dict(args).items() if k not in ("out", "no_compile", "smoke")}
    manager = ftrain.CheckpointManager(
        args.out, save_every=max(1, num_steps // 4), keep=2, best="val/acc", mode="max", config=config
    )
    state = ftrain.fit(
        state,
        train_step,
        train_loader,
        num_steps=num_steps,
        eval_step=eval_step,
        eval_data=eval_loader,
        eval_every=max(1, num_steps // 8),
        checkpoint=manager,
        log=[ftrain.writers.Console(), ftrain.writers.TensorBoard(args.out)],
        hparams=config,
    )
    manager.close()

    test_metrics = ftrain.evaluate(state, eval_step, ftrain.data.Loader(test, len(test), shuffle=False))
    print(
        f"test accuracy {test_metrics['acc']:.2%} (loss {test_metrics['loss']:.4f}) after {int(state.step)} steps, "
        f"{time.perf_counter() - start:.1f}s wall; checkpoints and logs in {args.out}"
    )
    return test_metrics["acc"]


if __name__ == "__main__":
    main()
