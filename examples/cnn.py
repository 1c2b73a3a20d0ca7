"""A small CNN with BatchNorm on the 8x8 digits, with data augmentation drawn from the step's key.

Shows two things a pure step has to handle explicitly:

- BatchNorm's running statistics are *buffers*: the model returns new ones and the step stores
  them in the state (no in-place update of a module);
- random augmentation (here: shift each image by up to one pixel in each direction; flips
  would not keep a digit's label) draws from the key the step hands to `loss_fn`, so a rerun,
  or a resumed run, sees the same shifts.

    python examples/cnn.py
    python examples/cnn.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules


def make_model(width: int) -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(1, width),
        block(width, width),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        block(width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


def random_shift(images: torch.Tensor, key: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], filling with zeros."""
    n, c, h, w = images.shape
    ky, kx = ftrain.random.split(key)
    dy = ftrain.random.randint(ky, 0, 2 * max_shift + 1, (n,), device=images.device)
    dx = ftrain.random.randint(kx, 0, 2 * max_shift + 1, (n,), device=images.device)
    padded = F.pad(images, (max_shift,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def eval_loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x.view(-1, 1, 8, 8) / 16.0)
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def train_loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    # The raw 0..16 pixels (normalize=False): a shift moves the ink, and the zero padding is background.
    x = random_shift(x.view(-1, 1, 8, 8), key) / 16.0
    logits, buffers = apply(params, buffers, x)  # new BatchNorm running stats come back as buffers
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv layers")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cnn")
    parser.add_argument("--no-compile", action="store_true", help="run the steps eagerly")
    parser.add_argument("--smoke", action="store_true", help="a few steps, tiny sizes, temp dir, eager")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.width, args.no_compile = 1, 4, True
        args.out = tempfile.mkdtemp(prefix="ftrain-cnn-")
    torch.manual_seed(args.seed)

    train, val, test = (
        ftrain.datasets.digits(split, seed=args.seed, normalize=False) for split in ("train", "val", "test")
    )
    loader = ftrain.data.Loader(train, args.batch_size, seed=args.seed)
    num_steps = 4 if args.smoke else args.epochs * len(loader)
    tx = optim.adamw(schedules.cosine_decay(args.lr, num_steps), weight_decay=1e-4)
    state = ftrain.TrainState.create(make_model(args.width), tx, key=ftrain.random.key(args.seed))

    compile = not args.no_compile
    train_step = ftrain.make_train_step(train_loss_fn, compile=compile)
    eval_step = ftrain.make_eval_step(eval_loss_fn, compile=compile)
    eval_loader = ftrain.data.Loader(val, 256, shuffle=False, drop_last=False)

    before = {k: v.clone() for k, v in state.buffers.items()}
    state = ftrain.fit(
        state,
        train_step,
        loader,
        num_steps=num_steps,
        eval_step=eval_step,
        eval_data=eval_loader,
        eval_every=max(1, num_steps // 5),
        log=ftrain.writers.Console(),
    )
    moved = [k for k in before if not torch.equal(before[k], state.buffers[k])]
    print(f"BatchNorm buffers updated by the steps: {len(moved)} of {len(before)}")
    test_metrics = ftrain.evaluate(state, eval_step, ftrain.data.Loader(test, 256, shuffle=False, drop_last=False))
    print(f"test accuracy {test_metrics['acc']:.2%}")
    return test_metrics["acc"]


if __name__ == "__main__":
    main()
