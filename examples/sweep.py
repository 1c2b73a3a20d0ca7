"""A learning rate x weight decay grid on the digits MLP, every member trained at once.

`ftrain.sweep.create` builds one member per setting and stacks them into one state; the sweep's
train step runs every member's step in one vmapped, compiled call, through `ftrain.fit`. The
schedule's peak is swept like any hyperparameter: the optimizer is an injected factory that takes
the peak (a tensor in each member's state) and scales a warmup-cosine shape by it. At the end the
script prints the final validation accuracy of every member as a table, saves it as a heat map
(with matplotlib: `pip install ftrain[plot]`), and tests the best member, unstacked into an
ordinary `TrainState`.

    python examples/sweep.py                                   # 4 x 4 = 16 members, 20 epochs
    python examples/sweep.py --lr 1e-3 3e-3 --weight-decay 0 0.1
    python examples/sweep.py --config sweep.yaml --epochs 5    # a YAML file of Config's fields, overridden
    python examples/sweep.py --smoke                           # 2 x 2, a few eager steps
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules, sweep


def make_model(dropout: float = 0.2) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 256), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(256, 10),
    )  # fmt: skip


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y, label_smoothing=0.1), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def table(lrs: list[float], wds: list[float], acc: list[float]) -> str:
    rows = ["peak lr \\ wd " + "".join(f"{wd:>9g}" for wd in wds)]
    for i, lr in enumerate(lrs):
        rows.append(f"{lr:>12g} " + "".join(f"{acc[i * len(wds) + j]:>9.2%}" for j in range(len(wds))))
    return "\n".join(rows)


def heat_map(path: Path, lrs: list[float], wds: list[float], acc: list[float]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'ftrain[plot]'): no heat map")
        return
    grid = torch.tensor(acc).view(len(lrs), len(wds)).numpy()
    fig, ax = plt.subplots(figsize=(1.1 * len(wds) + 2, 0.8 * len(lrs) + 1.2), dpi=80)
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(wds)), [f"{wd:g}" for wd in wds])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("weight decay")
    ax.set_ylabel("peak learning rate")
    ax.set_title("digits: validation accuracy")
    for (i, j), value in zip(((i, j) for i in range(len(lrs)) for j in range(len(wds))), grid.flat):
        dark = value < (grid.min() + grid.max()) / 2
        ax.text(j, i, f"{value:.1%}", ha="center", va="center", color="w" if dark else "k")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"heat map saved to {path}")


@dataclasses.dataclass
class Config:
    """A learning rate x weight decay grid on digits (see the module docstring)."""

    lr: list[float] = dataclasses.field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2])
    """peak learning rates"""
    weight_decay: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1e-3, 1e-2, 1e-1])
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    """every member starts from this seed's weights"""
    out: str = "runs/sweep"
    """the heat map and metrics go here"""
    no_compile: bool = False
    """run the steps eagerly"""
    smoke: bool = False
    """a 2 x 2 grid, a few eager steps, a temp dir"""


def main(argv: list[str] | None = None) -> dict:
    args = ftrain.config.parse(Config, argv, description=__doc__)
    if args.smoke:
        args = dataclasses.replace(args, lr=args.lr[:2], weight_decay=args.weight_decay[:2], no_compile=True,
                                   out=tempfile.mkdtemp(prefix="ftrain-sweep-"))  # fmt: skip
    start = time.perf_counter()

    train, val, test = (ftrain.datasets.digits(split, seed=args.seed) for split in ("train", "val", "test"))
    train_loader = ftrain.data.Loader(train, args.batch_size, seed=args.seed)
    num_steps = 5 if args.smoke else args.epochs * len(train_loader)

    # The schedule's shape has peak 1; each member's peak is an injected hyperparameter (a tensor
    # in its state), so one compiled step serves every peak.
    shape = schedules.warmup_cosine_decay(0.0, 1.0, warmup_steps=max(1, num_steps // 20), decay_steps=num_steps)

    def make_tx(peak_lr: float, weight_decay: float) -> optim.GradientTransformation:
        return optim.adamw(lambda count: peak_lr * shape(count), weight_decay=weight_decay)

    tx = optim.inject_hyperparams(make_tx)(peak_lr=args.lr[0], weight_decay=args.weight_decay[0])
    settings = sweep.grid(peak_lr=args.lr, weight_decay=args.weight_decay)
    state = sweep.create(make_model, tx, settings, seed=args.seed)

    compile = not args.no_compile
    train_step = sweep.train_step(ftrain.make_train_step(loss_fn, compile=False), compile=compile)
    eval_step = sweep.eval_step(ftrain.make_eval_step(loss_fn, compile=False), compile=compile)
    val_loader = ftrain.data.Loader(val, len(val), shuffle=False)
    # Per-member metrics are logged as train/loss/3, val/acc/3, ...; the console shows the means.
    # The resolved config goes to the writers with the per-member metrics.
    config = {k: v for k, v in ftrain.config.to_dict(args).items() if k not in ("out", "no_compile", "smoke")}
    state = ftrain.fit(state, train_step, train_loader, num_steps=num_steps, progress=False, hparams=config,
                       log=ftrain.writers.JSONL(Path(args.out) / "metrics.jsonl"), log_every=max(1, num_steps // 4))  # fmt: skip

    metrics = ftrain.evaluate(state, eval_step, val_loader)
    acc = sweep.member_values(metrics, "acc", state.size)
    print(f"{state.size} members, {num_steps} steps each, {time.perf_counter() - start:.1f}s wall")
    print(table(args.lr, args.weight_decay, acc))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    heat_map(Path(args.out) / "heatmap.png", args.lr, args.weight_decay, acc)

    i, member = sweep.best(state, metrics, "acc", mode="max")
    test_step = ftrain.make_eval_step(loss_fn, compile=False)  # one member: an ordinary TrainState
    test_acc = ftrain.evaluate(member, test_step, ftrain.data.Loader(test, len(test), shuffle=False))["acc"]
    print(f"best member {i} {state.setting(i)}: val accuracy {acc[i]:.2%}, test accuracy {test_acc:.2%}")
    return {"best": state.setting(i), "val_acc": acc, "test_acc": test_acc}


if __name__ == "__main__":
    main()
