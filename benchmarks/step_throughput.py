"""Steps/s of ftrain's compiled step against plain PyTorch loops, side by side in one run.

Same model, same data, CPU, fixed threads. Configs per model: eager torch loop with
``torch.optim.AdamW()`` (the reference, ratio 1.00), ``AdamW(fused=True)``, Lightning's Trainer
when installed, ftrain's compiled pure step and its donating form. Then a peak-memory row for a
~55M-parameter MLP, each config in its own process (peak resident memory during steady steps,
as a multiple of the params' size).

Run: ``python benchmarks/step_throughput.py [--steps 30] [--repeats 5] [--threads 2] [--skip-memory]``.
Medians over repeats; trust ratios, not absolute numbers, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim

LR = 1e-3


# ---------------------------------------------------------------------------------------------
# Models and data.


def mlp(widths=(784, 512, 512, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop1(self.proj(att))
        return x + self.drop2(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TinyGPT(nn.Module):
    """A small decoder-only transformer with dropout (2 layers, d=128, 4 heads, context 64)."""

    def __init__(self, vocab: int = 512, d: int = 128, layers: int = 2, heads: int = 4, ctx: int = 64, dropout=0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(d, heads, dropout) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        return self.head(self.ln(self.blocks(x)))


def mlp_data(n: int, batch: int = 128, widths=(784, 512, 512, 10)) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, widths[0], generator=g), torch.randint(0, widths[-1], (batch,), generator=g))
        for _ in range(n)
    ]


def gpt_data(n: int, batch: int = 16, ctx: int = 64, vocab: int = 512) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        seq = torch.randint(0, vocab, (batch, ctx + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def ftrain_loss(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return loss_of(logits, y), {}, buffers


# ---------------------------------------------------------------------------------------------
# Runners: each returns a function that does one training step.


def torch_runner(model: nn.Module, fused: bool) -> Callable[[tuple], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused or None)
    model.train()

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        loss_of(model(x), y).backward()
        opt.step()

    return step


def ftrain_runner(model: nn.Module, donate: bool) -> Callable[[tuple], None]:
    box = [ftrain.TrainState.create(model, optim.adamw(LR), key=ftrain.random.key(0))]
    train_step = ftrain.make_train_step(ftrain_loss)
    call = train_step.donate if donate else train_step

    def step(batch):
        box[0], _ = call(box[0], batch)

    return step


def lightning_runner(model: nn.Module, fused: bool) -> Callable[[tuple], None] | None:
    try:
        import lightning as L  # noqa: N812
    except ImportError:
        return None

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            return loss_of(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR, fused=fused or None)

    module = Module()

    def step_n(batches):
        trainer = L.Trainer(
            max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, batches)

    step_n.whole_loop = True  # type: ignore[attr-defined]
    return step_n


def warm_up(step: Callable, batches: list, warmup: int = 3) -> None:
    if getattr(step, "whole_loop", False):
        step(batches[:warmup])
    else:
        for i in range(warmup):  # includes the compile
            step(batches[i % len(batches)])


def time_steps(step: Callable, batches: list, steps: int) -> float:
    """Steps/s over ``steps`` steps."""
    t = time.perf_counter()
    if getattr(step, "whole_loop", False):
        step([batches[i % len(batches)] for i in range(steps)])
    else:
        for i in range(steps):
            step(batches[i % len(batches)])
    return steps / (time.perf_counter() - t)


CONFIGS: dict[str, Callable[[nn.Module], Callable | None]] = {
    "eager torch AdamW": lambda m: torch_runner(m, fused=False),
    "eager torch AdamW(fused=True)": lambda m: torch_runner(m, fused=True),
    "Lightning Trainer + AdamW": lambda m: lightning_runner(m, fused=False),
    "ftrain compiled (pure)": lambda m: ftrain_runner(m, donate=False),
    "ftrain compiled (donating)": lambda m: ftrain_runner(m, donate=True),
}


def throughput(args: argparse.Namespace) -> dict[str, dict[str, float | None]]:
    models = {
        "MLP 784-512-512-10, bs128": (mlp, mlp_data(8)),
        "TinyGPT 2x128 + dropout, bs16x64": (TinyGPT, gpt_data(8)),
    }
    table: dict[str, dict[str, float | None]] = {}
    for model_name, (build, batches) in models.items():
        runners = {}
        for name, make in CONFIGS.items():
            torch.manual_seed(0)
            runners[name] = make(build())
            if runners[name] is not None:
                warm_up(runners[name], batches)
        # Round robin over the configs in each repeat, so a load change on a shared machine hits all alike.
        rates: dict[str, list[float]] = {name: [] for name, r in runners.items() if r is not None}
        for _ in range(args.repeats):
            for name in rates:
                rates[name].append(time_steps(runners[name], batches, args.steps))
        table[model_name] = {name: (statistics.median(rates[name]) if name in rates else None) for name in runners}
        for name, rate in table[model_name].items():
            shown = "not installed" if rate is None else f"{rate:8.1f} steps/s"
            print(f"  {model_name:34s} {name:32s} {shown}", flush=True)
    return table


# ---------------------------------------------------------------------------------------------
# Peak memory, one process per config.

BIG = (1024, 4096, 4096, 4096, 4096, 1024)  # 54.6M params, 218 MB in float32


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(config: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    # Load the compiler for every config, so the baseline holds the same libraries.
    torch.compile(lambda x: x * 2, fullgraph=True)(torch.ones(2))
    batches = mlp_data(2, batch=64, widths=BIG)
    baseline = _status("VmRSS:")
    torch.manual_seed(0)
    model = mlp(BIG)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step = CONFIGS[config](model)
    warm_up(step, batches)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter: measure the steady steps only
    for i in range(5):
        step(batches[i % 2])
    print(json.dumps({"peak_over_params": (_status("VmHWM:") - baseline) / n_bytes, "params": n_bytes}))


def memory(args: argparse.Namespace) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in CONFIGS:
        if name.startswith("Lightning"):
            continue
        env = {**os.environ, "BENCH_THREADS": str(args.threads)}
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", name], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            out[name] = None
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_over_params"]
        print(f"  {name:32s} peak {out[name]:.2f} x params", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps x {args.repeats} repeats (median)")
    table = throughput(args)
    names = list(CONFIGS)
    print("\n| config | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for name in names:
        cells = []
        for model_name in table:
            rate, ref = table[model_name][name], table[model_name]["eager torch AdamW"]
            cells.append("not installed" if rate is None else f"{rate / ref:.2f}x ({rate:.1f}/s)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if not args.skip_memory:
        print(f"\nPeak memory during steady steps, MLP {'-'.join(map(str, BIG))} (separate processes):")
        mem = memory(args)
        print("\n| config | peak RSS over baseline, x params |\n|---|---|")
        for name, value in mem.items():
            print(f"| {name} | {'failed' if value is None else f'{value:.2f}'} |")


if __name__ == "__main__":
    main()
