"""Fine-tune a Hugging Face classifier with its encoder frozen: only the head is trained.

Freezing is plain PyTorch: ``model.bert.requires_grad_(False)`` before ``TrainState.create``. The
frozen parameters stay in ``state.params`` (saved, restored, exported with the rest) but the step
takes no gradient for them, the optimizer keeps no state for them, and they never change. The run
trains the same model twice, frozen and in full, and prints both steps' speed.

The model is a BERT built from its config class with random weights (nothing is downloaded); for
real work load one with ``BertForSequenceClassification.from_pretrained(name)`` instead. The task
is synthetic: a sequence's label is whether its first token is in the lower half of the
vocabulary, which a linear head can read off the frozen encoder's features.

    python examples/finetune.py
    python examples/finetune.py --smoke
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import BertConfig, BertForSequenceClassification

import ftrain
from ftrain import optim


def make_model(hidden: int, layers: int, vocab: int, seq: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=seq, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def batches(n: int, batch_size: int, vocab: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
        out.append({"input_ids": ids, "labels": (ids[:, 0] < vocab // 2).long()})
    return out


def loss_fn(apply, params, buffers, batch, key):
    out, buffers = apply(params, buffers, **batch, key=key)
    accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean()
    return out.loss, {"accuracy": accuracy}, buffers


def train(args: argparse.Namespace, frozen: bool) -> tuple[ftrain.TrainState, float, float]:
    """Train for ``args.steps`` steps; returns the state, steady steps/s and the last accuracy."""
    torch.manual_seed(0)
    model = make_model(args.hidden, args.layers, args.vocab, args.seq)
    if frozen:
        model.bert.requires_grad_(False)  # the encoder (embeddings, layers, pooler): only the classifier trains
    state = ftrain.TrainState.create(model, optim.adamw(args.lr))
    train_step = ftrain.make_train_step(loss_fn, compile=args.compile)
    data = batches(args.steps, args.batch_size, args.vocab, args.seq, seed=1)
    state, metrics = train_step(state, data[0])  # (the first step compiles)
    float(metrics["loss"])
    start = time.perf_counter()
    for batch in data[1:]:
        state, metrics = train_step(state, batch)
    accuracy = float(metrics["accuracy"])
    steps_per_s = (len(data) - 1) / (time.perf_counter() - start)
    return state, steps_per_s, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="a few eager steps of a tiny model")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.hidden, args.layers, args.seq, args.compile = 6, 8, 32, 1, 16, False

    torch.manual_seed(0)
    initial = make_model(args.hidden, args.layers, args.vocab, args.seq).bert.state_dict()
    frozen, frozen_speed, accuracy = train(args, frozen=True)
    _, full_speed, _ = train(args, frozen=False)

    encoder = {n: p for n, p in frozen.params.items() if n.startswith("bert.")}
    unchanged = all(torch.equal(p, initial[n.removeprefix("bert.")]) for n, p in encoder.items())
    trained = sum(p.numel() for n, p in frozen.params.items() if n not in encoder)
    print(f"trainable parameters: {trained:,} of {sum(p.numel() for p in frozen.params.values()):,}")
    print(f"encoder weights unchanged after training: {unchanged}")
    print(f"frozen encoder: {frozen_speed:.1f} steps/s, training everything: {full_speed:.1f} steps/s "
          f"({frozen_speed / full_speed:.2f}x); last batch accuracy (frozen) {accuracy:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
