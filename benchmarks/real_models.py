"""Steps/s on models nobody here wrote: plain PyTorch eager AdamW, ftrain eager, ftrain compiled.

Per model (tiny random-init ``transformers`` models from tests/zoo_models.py, and the digits
example's 64-128-256-10 MLP at batch 64), side by side in one process: a plain PyTorch loop with
``torch.optim.AdamW()`` (its default implementation, which on CPU tensors is the per-tensor loop,
not foreach; the reference, ratio 1.00), ftrain's step with ``compile=False``, pure
(``train_step(state, batch)``) and donated (``train_step.donate``, what ``fit`` runs: the update
writes into the input's params and moments), and ftrain's compiled step, whose first call's time
(the compile) is reported too. The configs are timed round robin in short chunks (``--chunks``
rounds of ``--steps`` steps) so a change of load hits each alike; the table gives medians over chunks of
the steps/s and of each round's ratio to plain PyTorch. ``--clock cpu`` times by this process's CPU
time instead of the wall clock: on a loaded machine, with ``--threads 1``, the steadier measure.
Dropout is off (``--dropout`` sets it): torch's native dropout and ftrain's keyed one are different
computations.

``--memory`` measures instead what activation checkpointing saves: peak resident memory during
steady steps (above the resident memory after a first step) of a 4-layer GPT-2 on 16 x 256
tokens, with and without ``model.activation_checkpointing_enable()``, eager and compiled, each
config in its own fresh process.

Run: ``python benchmarks/real_models.py [--models gpt2,bert,...] [--chunks 15] [--steps 10]
[--threads 2] [--clock wall|cpu] [--no-compile] [--memory]``. Trust the ratios, not absolute numbers, on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import zoo_models  # noqa: E402

import ftrain  # noqa: E402
from ftrain import optim  # noqa: E402

LR = 1e-3

Step = Callable[[dict], object]


def plain_pytorch(model: zoo_models.ZooModel, dropout: float) -> Step:
    module = model.build(0, dropout=dropout)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=LR)

    def step(batch: dict) -> torch.Tensor:
        opt.zero_grad()
        loss = model.torch_loss(module, batch)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def ftrain_step(model: zoo_models.ZooModel, dropout: float, compile: bool, donate: bool = False) -> Step:
    holder = [ftrain.TrainState.create(model.build(0, dropout=dropout), optim.adamw(LR))]
    train_step = ftrain.make_train_step(model.loss_fn, compile=compile)
    run = train_step.donate if donate else train_step

    def step(batch: dict) -> torch.Tensor:
        holder[0], metrics = run(holder[0], batch)
        return metrics["loss"]

    return step


def bench(model: zoo_models.ZooModel, args: argparse.Namespace) -> dict[str, object]:
    batches = model.batches(args.steps)
    configs: dict[str, Step] = {
        "pytorch": plain_pytorch(model, args.dropout),
        "eager": ftrain_step(model, args.dropout, compile=False),
        "donated": ftrain_step(model, args.dropout, compile=False, donate=True),
    }
    row: dict[str, object] = {"model": model.name}
    if args.compile:
        compiled = ftrain_step(model, args.dropout, compile=True)
        start = time.perf_counter()
        try:
            compiled(batches[0])
        except Exception as e:  # (report it and time the rest)
            row["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        else:
            row["compile_s"] = time.perf_counter() - start
            configs["compiled"] = compiled
    for step in configs.values():  # warm up: first-call checks, allocator, caches
        for batch in batches[:3]:
            step(batch)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.chunks):
        for name, step in configs.items():
            start = clock()
            for batch in batches:
                loss = step(batch)
            float(loss)  # (wait for the last step)
            times[name].append((clock() - start) / len(batches))
    for name, samples in times.items():
        row[f"{name}_steps_s"] = 1.0 / statistics.median(samples)
        # The ratio per round (the configs ran back to back), then its median: robust to load that shifts.
        row[f"{name}_ratio"] = statistics.median(b / t for b, t in zip(times["pytorch"], samples))
    return row


def peak_memory(checkpointing: bool, compile: bool) -> float:
    """MB of resident memory the steady steps add at their peak (Linux: /proc/self), after a first step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=512, n_positions=256, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # (keyed dropout + eager checkpointing: refused)
    model = GPT2LMHeadModel(config)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    state = ftrain.TrainState.create(model, optim.adamw(LR))
    train_step = ftrain.make_train_step(zoo_models.GPT2.loss_fn, compile=compile)
    ids = torch.randint(0, 512, (16, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    state, _ = train_step(state, batch)  # (compiles; its memory is not the step's)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident memory
        f.write("5")
    before = _status_kb("VmRSS")
    for _ in range(3):
        state, metrics = train_step(state, batch)
    float(metrics["loss"])
    return (_status_kb("VmHWM") - before) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_table(args: argparse.Namespace) -> None:
    print("| activation checkpointing (GPT-2, 4 layers, 16 x 256 tokens) | peak MB added by the steps |\n|---|---|")
    for compile in (False, True) if args.compile else (False,):
        for checkpointing in (False, True):
            code = (
                f"import sys; sys.argv = ['real_models']; import torch; torch.set_num_threads({args.threads}); "
                f"import real_models; print(real_models.peak_memory({checkpointing}, {compile}))"
            )
            path = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), *sys.path])
            # Tensors of 64 KiB and up in their own mappings, returned on free: resident memory is live memory.
            env = {**os.environ, "PYTHONPATH": path, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            errors = [line for line in out.stderr.splitlines() if line.startswith(("RuntimeError", "ftrain."))]
            result = f"{float(out.stdout.split()[-1]):.0f}" if out.returncode == 0 else f"failed: {errors[-1:]}"
            name = f"{'compiled' if compile else 'eager'}, {'checkpointed' if checkpointing else 'plain'}"
            print(f"| {name} | {result} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(m.name for m in zoo_models.ALL))
    parser.add_argument("--chunks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time by wall clock or CPU time")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--memory", action="store_true", help="activation checkpointing's peak memory instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} threads, {args.chunks} chunks x {args.steps} steps, dropout {args.dropout}, "
        f"{args.clock} clock, load {os.getloadavg()[0]:.1f}"
    )
    if args.memory:
        memory_table(args)
        return
    header = (
        "| model | PyTorch AdamW steps/s | ftrain eager | ratio | eager donated | ratio "
        "| ftrain compiled | ratio | compile s |"
    )
    print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
    for name in args.models.split(","):
        row = bench(zoo_models.BY_NAME[name], args)
        base, eager, donated = row["pytorch_steps_s"], row["eager_steps_s"], row["donated_steps_s"]
        if "compiled_steps_s" in row:
            compiled = f"{row['compiled_steps_s']:.1f} | {row['compiled_ratio']:.2f}x | {row['compile_s']:.0f}"
        else:
            compiled = f"{row.get('compiled_error', 'not run')} | | "
        eager = f"{eager:.1f} | {row['eager_ratio']:.2f}x | {donated:.1f} | {row['donated_ratio']:.2f}x"
        print(f"| {name} | {base:.1f} | {eager} | {compiled} |", flush=True)


if __name__ == "__main__":
    main()
