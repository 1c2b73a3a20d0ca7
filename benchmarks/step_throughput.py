"""Steps/s of ftrain's compiled step against plain PyTorch loops, side by side in one run.

Same model, same data, CPU, fixed threads. Configs per model: eager torch loop with
``torch.optim.AdamW()`` (the reference, ratio 1.00), ``AdamW(fused=True)``, Lightning's Trainer
when installed (timed by a callback's clock between its steady steps, so its setup is left
out), ftrain's compiled pure step and its donating form, and, for the MLP, its matmuls alone
(the floor: no step can be faster). Then the same loop and step with bf16 autocast (fp32
params), a pair to compare with each other. Then a peak-memory row for a ~55M-parameter MLP,
each config in its own process (peak resident memory during steady steps, as a multiple of the
params' size).

The throughput part runs in ``--processes`` fresh processes, one after another: the eager
baseline's speed differs from process to process (how often its temporaries fault in fresh pages
depends on the allocator's state: the page-fault column shows it), so one process is one sample.
Each process times the configs round robin in short chunks (``--repeats`` rounds of ``--steps``
steps), so a change of load hits every config alike; the table gives the median of the
per-process ratios and their range.

Run: ``python benchmarks/step_throughput.py [--processes 3] [--repeats 20] [--steps 10] [--threads 2]
[--skip-memory]``. Trust ratios, not absolute numbers, on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def torch_runner(model: nn.Module, fused: bool, bf16: bool = False) -> Callable[[tuple], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused or None)
    model.train()

    def step(batch):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(model(x), y)
        loss.backward()
        opt.step()

    return step


def ftrain_runner(model: nn.Module, donate: bool, precision: str | None = None) -> Callable[[tuple], None]:
    box = [ftrain.TrainState.create(model, optim.adamw(LR), key=ftrain.random.key(0))]
    train_step = ftrain.make_train_step(ftrain_loss, precision=precision)
    call = train_step.donate if donate else train_step

    def step(batch):
        box[0], _ = call(box[0], batch)

    return step


def matmul_floor_runner(model: nn.Module) -> Callable[[tuple], None] | None:
    """Only the MLP step's matrix products (3 forward, 5 backward), into preallocated outputs.

    No step can be faster than its matmuls, so ``eager AdamW / this`` is the most any compiler
    or optimizer could win on this model and CPU. MLPs only (``None`` for other models).
    """
    layers = [m for m in model if isinstance(m, nn.Linear)] if isinstance(model, nn.Sequential) else []
    if not layers or len(layers) != sum(1 for p in model.parameters()) // 2:
        return None
    ws = [layer.weight.detach() for layer in layers]
    bs = [layer.bias.detach() for layer in layers]
    bufs: dict[tuple, torch.Tensor] = {}

    def buf(key: tuple, rows: int, cols: int) -> torch.Tensor:
        if key not in bufs:
            bufs[key] = torch.empty(rows, cols)
        return bufs[key]

    def step(batch):
        h = [batch[0]]
        for i, (w, b) in enumerate(zip(ws, bs)):  # forward: h @ W.T + b
            h.append(torch.addmm(b, h[-1], w.t(), out=buf(("h", i), h[-1].shape[0], w.shape[0])))
        g = h[-1]  # stands in for the loss gradient: same shape
        for i in reversed(range(len(ws))):  # backward: dW = g.T @ h_in; dh_in = g @ W (not for the input)
            torch.mm(g.t(), h[i], out=buf(("dw", i), *ws[i].shape))
            if i:
                g = torch.mm(g, ws[i], out=buf(("dh", i), g.shape[0], ws[i].shape[1]))

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
    ticks: list[float] = []

    class Batches:  # (a plain list would be taken for a list of dataloaders)
        def __init__(self, items: list):
            self.items = items

        def __iter__(self):
            return iter(self.items)

        def __len__(self) -> int:
            return len(self.items)

    class Clock(L.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            ticks.append(time.perf_counter())

    def step_n(batches):
        """Run ``len(batches)`` steps in one ``fit``; the steady steps' durations (setup excluded)."""
        ticks.clear()
        trainer = L.Trainer(
            max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
        )  # fmt: skip
        trainer.fit(module, Batches(batches))
        return [b - a for a, b in zip(ticks, ticks[1:])]

    step_n.whole_loop = True  # type: ignore[attr-defined]
    return step_n


def warm_up(step: Callable, batches: list, warmup: int = 3) -> None:
    if getattr(step, "whole_loop", False):
        step(batches[:warmup])
    else:
        for i in range(warmup):  # includes the compile
            step(batches[i % len(batches)])


def time_steps(step: Callable, batches: list, steps: int) -> tuple[float, float | None]:
    """Seconds per step and minor page faults per step (None for a Trainer), over ``steps`` steps."""
    if getattr(step, "whole_loop", False):  # a Trainer: one fit, timed by its own steady steps
        durations = step([batches[i % len(batches)] for i in range(steps + 1)])
        return sum(durations) / len(durations), None  # (its faults would count the Trainer's setup)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    seconds = (time.perf_counter() - t) / steps
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps


FLOOR = "the MLP's matmuls alone (floor)"
CONFIGS: dict[str, Callable[[nn.Module], Callable | None]] = {
    "eager torch AdamW": lambda m: torch_runner(m, fused=False),
    "eager torch AdamW(fused=True)": lambda m: torch_runner(m, fused=True),
    "Lightning Trainer + AdamW": lambda m: lightning_runner(m, fused=False),
    "ftrain compiled (pure)": lambda m: ftrain_runner(m, donate=False),
    "ftrain compiled (donating)": lambda m: ftrain_runner(m, donate=True),
    FLOOR: matmul_floor_runner,
    # bf16 autocast, fp32 params (numbers differ from the rows above: compare these two with each other)
    "eager torch AdamW, bf16 autocast": lambda m: torch_runner(m, fused=False, bf16=True),
    "ftrain compiled (donating), bf16": lambda m: ftrain_runner(m, donate=True, precision="bf16"),
}
MEMORY_CONFIGS = [
    "eager torch AdamW",
    "eager torch AdamW(fused=True)",
    "ftrain compiled (pure)",
    "ftrain compiled (donating)",
]
REFERENCE = "eager torch AdamW"
MODELS = {
    "MLP 784-512-512-10, bs128": (mlp, lambda: mlp_data(8)),
    "TinyGPT 2x128 + dropout, bs16x64": (TinyGPT, lambda: gpt_data(8)),
}


def throughput_child(args: argparse.Namespace) -> None:
    """One process: every config of every model, timed in alternating short chunks."""
    torch.set_num_threads(args.threads)
    out: dict[str, dict] = {}
    for model_name, (build, data) in MODELS.items():
        batches = data()
        runners = {}
        for name, make in CONFIGS.items():
            torch.manual_seed(0)
            runner = make(build())
            if runner is not None:
                warm_up(runner, batches)
                runners[name] = runner
        # Round robin in short chunks, so a change of load on a shared machine hits every config alike.
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, runner in runners.items():
                samples[name].append(time_steps(runner, batches, args.steps))
        out[model_name] = {
            name: {
                "steps_per_s": 1 / statistics.median(s for s, _ in samples[name]),
                "faults_per_step": None
                if samples[name][0][1] is None
                else statistics.median(f for _, f in samples[name]),
            }
            for name in runners
        }
    print(json.dumps(out))


def throughput(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """Run ``throughput_child`` in ``args.processes`` fresh processes, one after another."""
    runs: dict[str, dict[str, list[dict]]] = {model: {name: [] for name in CONFIGS} for model in MODELS}
    for i in range(args.processes):
        argv = [sys.executable, __file__, "--throughput-child", "--threads", str(args.threads)]
        argv += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"throughput child failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"process {i + 1}/{args.processes} (load average {os.getloadavg()[0]:.2f}):")
        for model_name, rows in result.items():
            ref = rows[REFERENCE]["steps_per_s"]
            for name, row in rows.items():
                runs[model_name][name].append(row)
                print(
                    f"  {model_name:34s} {name:30s} {row['steps_per_s']:7.1f} steps/s {row['steps_per_s'] / ref:5.2f}x "
                    f"{'-' if row['faults_per_step'] is None else round(row['faults_per_step']):>7} page faults/step",
                    flush=True,
                )
    return runs


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
    for name in MEMORY_CONFIGS:
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
    parser.add_argument("--processes", type=int, default=3, help="fresh processes to measure in (default 3)")
    parser.add_argument("--repeats", type=int, default=20, help="rounds over the configs per process (default 20)")
    parser.add_argument("--steps", type=int, default=10, help="steps per config per round (default 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--throughput-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.throughput_child:
        throughput_child(args)
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.processes} processes x {args.repeats} rounds "
        f"x {args.steps} steps per config (medians)"
    )
    runs = throughput(args)
    print(f"\nSteps/s as a ratio to {REFERENCE!r}, median over the processes [lowest - highest]:")
    print("\n| config | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in CONFIGS:
        cells = []
        for by_config in runs.values():
            if not by_config[name]:
                cells.append("not installed" if name.startswith("Lightning") else "n/a")
                continue
            ratios = [r["steps_per_s"] / ref["steps_per_s"] for r, ref in zip(by_config[name], by_config[REFERENCE])]
            rate = statistics.median(r["steps_per_s"] for r in by_config[name])
            cells.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] ({rate:.1f}/s)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if not args.skip_memory:
        print(f"\nPeak memory during steady steps, MLP {'-'.join(map(str, BIG))} (separate processes):")
        mem = memory(args)
        print("\n| config | peak RSS over baseline, x params |\n|---|---|")
        for name, value in mem.items():
            print(f"| {name} | {'failed' if value is None else f'{value:.2f}'} |")


if __name__ == "__main__":
    main()
