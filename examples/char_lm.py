"""A character-level transformer language model trained on Python's own standard library.

The text ships with Python (a few modules read from `sysconfig.get_paths()["stdlib"]`), so
there is nothing to download. Shows dropout driven by the step's key, a warmup-cosine
schedule, an optional bf16 autocast policy, resuming from the latest checkpoint (interrupt it
and run the same command again) and sampling from the trained model.

The unigram baseline is the entropy of the character frequencies: the loss of a model that
ignores context. A model that learned anything beats it by a wide margin.

    python examples/char_lm.py                      # default run
    python examples/char_lm.py                      # again, after Ctrl-C: resumes where it stopped
    python examples/char_lm.py --bf16               # autocast the forward/backward to bfloat16
    python examples/char_lm.py --smoke
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules

MODULES = ["argparse", "dataclasses", "functools", "textwrap", "shutil", "string", "random", "contextlib"]


def read_text(modules: list[str]) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f"{m}.py" for m in modules]
    found = [f for f in files if f.is_file()]
    if not found:
        raise FileNotFoundError(f"none of {[str(f) for f in files]} exist; pass other --modules")
    return "".join(f.read_text(encoding="utf-8") for f in found)


def unigram_entropy(text: str) -> float:
    """The entropy (nats per character) of the character frequencies of ``text``."""
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` token ids: input = window[:-1], target = window[1:]."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.ids[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return w[:-1], w[1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + F.dropout(self.proj(att.transpose(1, 2).reshape(b, t, d)), p, self.training)
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        return self.head(self.ln(self.blocks(x)))


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)  # every dropout mask is drawn from `key`
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), {}, buffers


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, steps: int, key: torch.Tensor, temperature: float = 0.8):
    """Sample ``steps`` tokens after ``prompt`` (Gumbel-max trick over keyed uniform noise)."""
    seq_len = model.pos.num_embeddings
    ids = prompt
    for i in range(steps):
        logits = model(ids[None, -seq_len:])[0, -1].float() / temperature
        u = ftrain.random.uniform(ftrain.random.fold_in(key, i), logits.shape).clamp_min(1e-12)
        ids = torch.cat([ids, (logits - torch.log(-torch.log(u))).argmax()[None]])
    return ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--bf16", action="store_true", help="autocast forward/backward to bfloat16 (fp32 params)")
    parser.add_argument("--modules", nargs="+", default=MODULES, help="stdlib modules to train on")
    parser.add_argument("--sample-chars", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/char_lm")
    parser.add_argument("--no-compile", action="store_true", help="run the steps eagerly")
    parser.add_argument("--smoke", action="store_true", help="a few steps, a tiny model, temp dir, eager")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.dim, args.layers, args.heads = 6, 2, 32, 32, 1, 2
        args.modules, args.sample_chars, args.no_compile = ["string"], 40, True
        args.out = tempfile.mkdtemp(prefix="ftrain-char-lm-")
    torch.manual_seed(args.seed)

    text = read_text(args.modules)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(ids))
    train, val = Windows(ids[:split], args.seq_len), Windows(ids[split:], args.seq_len)
    baseline = unigram_entropy(text[:split])
    print(f"{len(text):,} characters from {len(args.modules)} stdlib modules, vocabulary {len(vocab)}")
    print(f"unigram baseline: {baseline:.3f} nats/char (the loss of a model that ignores context)")

    lr = schedules.warmup_cosine_decay(
        init_value=0.0, peak_value=args.lr, warmup_steps=args.warmup, decay_steps=args.steps, end_value=args.lr / 20
    )
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, b2=0.99, weight_decay=0.1))
    model = CharTransformer(len(vocab), args.seq_len, args.dim, args.layers, args.heads, args.dropout)
    state = ftrain.TrainState.create(model, tx, key=ftrain.random.key(args.seed))
    print(f"model: {sum(p.numel() for p in state.params.values()):,} params")

    compile = not args.no_compile
    precision = "bf16" if args.bf16 else None
    train_step = ftrain.make_train_step(loss_fn, compile=compile, precision=precision)
    eval_step = ftrain.make_eval_step(loss_fn, compile=compile, precision=precision)
    loader = ftrain.data.Loader(train, args.batch_size, seed=args.seed)
    eval_loader = ftrain.data.Loader(val, args.batch_size, shuffle=False)

    # Resumes from the latest checkpoint in --out if there is one (params, optimizer, key and data
    # position): stop the run at any point and start the same command again to continue.
    config = {k: v for k, v in vars(args).items() if k not in ("out", "no_compile", "smoke", "sample_chars")}
    manager = ftrain.CheckpointManager(args.out, save_every=max(1, args.steps // 4), keep=2, config=config)
    state = ftrain.fit(
        state,
        train_step,
        loader,
        num_steps=args.steps,
        eval_step=eval_step,
        eval_data=eval_loader,
        eval_every=max(1, args.steps // 10),
        checkpoint=manager,
        log=[ftrain.writers.Console(), ftrain.writers.TensorBoard(args.out)],
        hparams=config,
    )
    manager.close()

    val_loss = ftrain.evaluate(state, eval_step, eval_loader)["loss"]
    print(f"val loss {val_loss:.3f} nats/char vs unigram baseline {baseline:.3f} ({val_loss / baseline:.0%} of it)")
    prompt = "def "
    out = sample(
        state.to_module().eval(),
        torch.tensor([index[c] for c in prompt]),
        args.sample_chars,
        ftrain.random.key(args.seed + 1),
    )
    print("sample:\n" + "".join(vocab[i] for i in out.tolist()))
    return {"val_loss": val_loss, "baseline": baseline}


if __name__ == "__main__":
    main()
