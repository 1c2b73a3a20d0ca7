"""The GPU proof: GPT-2 small trained by nanoGPT's plain loop and by ftrain's step, on one GPU.

One run, about 8 minutes on one H100/H200-class GPU, writes ``OUT/gpu.json`` and ``OUT/gpu.md``
(a markdown table) and one log per job. The model is nanoGPT's GPT-2 small (12 layers, 768 wide,
12 heads, context 1024, vocabulary padded to 50304, no biases, tied embeddings), written out below;
the data are random tokens (nothing is downloaded); bf16 autocast over fp32 params; AdamW
(betas 0.9/0.95, weight decay 0.1) after clipping the gradients' global norm to 1, as nanoGPT.

Rows, each job in a fresh process (its own peak memory, compiler state and time limit):

- (a) nanoGPT's loop: ``torch.compile(model)``, ``torch.optim.AdamW(fused=True)``, backward and
  step in eager PyTorch; then the same loop with 4 micro-batches per step (a's compiled model).
- (b) ftrain's compiled donating step (``make_train_step(...).donate``, default settings:
  ``deterministic=True``, ``fullgraph=True``).
- (c) ftrain's donating step with ``accumulate=4`` (4 micro-batches inside the one graph).
- ``examples/ddp.py --no-compile`` under ``torchrun --nproc-per-node 1``: one rank through NCCL
  (gloo on CPU), its checkpoints and evaluation included.

Each row: tokens/s over steady steps (warmup and compile excluded; timed with CUDA events),
MFU (FLOPs per token as nanoGPT counts them, ``6 N + 12 L d T`` with N the non-embedding params,
over the GPU's dense bf16 peak, looked up by its name), peak memory
(``torch.cuda.max_memory_allocated`` over the steady steps), compile time (first step minus a
steady one; ftrain's steps compile into a fresh step cache, so this is a cold compile), and the
graphs and graph breaks dynamo reported.

The jobs share a time budget (``--budget``, 460 s): each runs under the time left, less 45 s for
every job after it, and is killed with all it started when that runs out (its row then says so);
both files are rewritten after every job. The longest compile is (c): its graph unrolls 4 forward
and backward passes (about 2.3x the nodes of (b)'s for GPT-2 small).

Run::

    python benchmarks/gpu.py --out runs/gpu        # one CUDA GPU
    python benchmarks/gpu.py --dry-run --out DIR   # every path on CPU, tiny model, seconds (CI)

``--dry-run`` runs the same jobs on CPU with a tiny model, a few steps, the ``aot_eager`` backend
(dynamo traces exactly as on a GPU, so graph breaks show; no kernels are generated) and gloo, and
fails unless the checks hold: every job ran, ftrain's steps are one graph with no breaks, plain
and ftrain start from the same loss, both files written.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import compile_times, counters

import ftrain
from ftrain import optim

ROOT = Path(__file__).resolve().parent.parent
LR, BETAS, WEIGHT_DECAY, CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0  # nanoGPT's GPT-2 settings

# Dense (not sparse) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s, matched against
# torch.cuda.get_device_name(): most specific first ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
)
DRY_RUN_PEAK_TFLOPS = 1.0  # a nominal CPU "peak", so the dry run computes MFU the same way

ROWS = {  # job rows, in table order
    "plain": "(a) torch.compile(model) + fused AdamW (nanoGPT's loop)",
    "plain_accumulate": "(a) the same loop, {n} micro-batches per step",
    "ftrain": "(b) ftrain compiled donating step",
    "ftrain_accumulate": "(c) ftrain donating step, accumulate={n}",
}
JOBS = ("plain", "ftrain", "ftrain_accumulate", "ddp")  # run order: ddp (short, no compile) last
JOB_ROWS = {"plain": ("plain", "plain_accumulate"), "ftrain": ("ftrain",), "ftrain_accumulate": ("ftrain_accumulate",)}
RESERVE_S = 45.0  # of the budget, kept for each job still to run
CUBLAS_WORKSPACE = ":4096:8"


# ---------------------------------------------------------------------------------------------
# The model: nanoGPT's GPT (no dropout: GPT-2 pretraining runs with dropout 0).


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    layers: int = 12
    width: int = 768
    heads: int = 12
    context: int = 1024
    vocab: int = 50304  # GPT-2's 50257 tokens padded to a multiple of 64, as nanoGPT does


GPT2_SMALL = GPTConfig()
TINY = GPTConfig(layers=2, width=64, heads=4, context=32, vocab=256)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width, bias=False)
        self.proj = nn.Linear(c.width, c.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on a GPU
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.width, bias=False), nn.LayerNorm(c.width, bias=False)
        self.attn = Attention(c)
        self.fc = nn.Linear(c.width, 4 * c.width, bias=False)
        self.out = nn.Linear(4 * c.width, c.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """``GPT(config)(tokens, targets) -> loss``: the loss is computed inside the forward, as nanoGPT's."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tok, self.pos = nn.Embedding(c.vocab, c.width), nn.Embedding(c.context, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.width, bias=False)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() == 2:  # nanoGPT's init: N(0, 0.02), residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * c.layers) if name.endswith(("attn.proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def non_embedding_params(model: nn.Module) -> int:
    """Parameters without the position embedding, as nanoGPT counts N (the tied token embedding counts)."""
    return sum(p.numel() for p in model.parameters()) - model.pos.weight.numel()


def flops_per_token(c: GPTConfig, n_params: int) -> int:
    """Training FLOPs per token, nanoGPT's ``estimate_mfu``: 6 per parameter plus attention's 12 L d T."""
    return 6 * n_params + 12 * c.layers * c.width * c.context


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name; ``None`` if the table does not know it."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def random_batches(c: GPTConfig, rows: int, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of random tokens, ``(inputs, next tokens)``, already on the device (data are not timed)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, c.vocab, (rows, c.context + 1), generator=g)
        out.append((seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)))
    return out


# ---------------------------------------------------------------------------------------------
# The steps. Each returns ``step(batch) -> loss`` (a 0-d tensor: no host sync).


def plain_loop(model: nn.Module, backend: str) -> Callable[[tuple, int], torch.Tensor]:
    """nanoGPT's train.py loop: compiled model, eager backward, clipping and fused AdamW."""
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
    device_type = next(model.parameters()).device.type

    def step(batch: tuple, accumulate: int = 1) -> torch.Tensor:
        total = torch.zeros((), device=batch[0].device)
        for x, y in zip(batch[0].chunk(accumulate), batch[1].chunk(accumulate)):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = compiled(x, y) / accumulate
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step


def ftrain_loss(apply, params, buffers, batch, key):
    x, y = batch
    loss, buffers = apply(params, buffers, x, y, key=key)
    return loss, {}, buffers


def ftrain_loop(model: nn.Module, backend: str, accumulate: int) -> tuple[Callable[[tuple], torch.Tensor], object]:
    """ftrain's compiled donating step with its defaults; the same optimizer as the plain loop."""
    tx = optim.chain(
        optim.clip_by_global_norm(CLIP), optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY)
    )
    box = [ftrain.TrainState.create(model, tx, key=ftrain.random.key(0))]
    train_step = ftrain.make_train_step(ftrain_loss, precision="bf16", accumulate=accumulate, backend=backend)

    def step(batch: tuple) -> torch.Tensor:
        box[0], metrics = train_step.donate(box[0], batch)
        return metrics["loss"]

    return step, train_step


# ---------------------------------------------------------------------------------------------
# Measuring one row (in a child process).


class Clock:
    """Seconds from ``start()`` to ``stop()``: CUDA events on a GPU (its own timeline), else the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[tuple], torch.Tensor], batches: list, args: argparse.Namespace) -> dict:
    """First step (compile included), warmup, then ``args.steps`` timed steady steps."""
    device = batches[0][0].device
    sync(device)
    t0 = time.perf_counter()
    first_loss = float(step(batches[0]))  # (float() waits for the device)
    first_s = time.perf_counter() - t0
    for i in range(1, args.warmup + 1):
        step(batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device)
    clock.start()
    for i in range(args.steps):
        loss = step(batches[i % len(batches)])
    seconds = clock.stop()
    return {
        "step_s": seconds / args.steps,
        "first_step_s": first_s,
        "compile_s": max(0.0, first_s - seconds / args.steps),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "graphs": counters["stats"]["unique_graphs"],  # (what dynamo did in this process so far)
        "graph_breaks": sum(counters["graph_break"].values()),
        "loss_first": first_loss,
        "loss_last": float(loss),
        "steps_timed": args.steps,
        "compile_breakdown": compile_times(repr="str"),  # seconds per compiler phase: where a long compile went
    }


def child(args: argparse.Namespace) -> None:
    """One job's rows, each written to ``args.result`` as soon as it is measured."""
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as nanoGPT
    c = TINY if args.dry_run else GPT2_SMALL
    torch.manual_seed(0)
    model = GPT(c).to(device)
    batches = random_batches(c, args.batch * args.accumulate, 4, device)
    one = [(x[: args.batch], y[: args.batch]) for x, y in batches]  # the rows of a step without accumulation
    results: dict[str, dict] = {}

    def row(name: str, step: Callable, data: list, accumulate: int) -> None:
        results[name] = {
            "name": ROWS[name].format(n=accumulate),
            "status": "ok",
            "tokens_per_step": accumulate * args.batch * c.context,
            "micro_batches": accumulate,
            **measure(step, data, args),
        }
        Path(args.result).write_text(json.dumps(results))

    if args.child == "plain":
        step = plain_loop(model, args.backend)
        row("plain", step, one, 1)
        row("plain_accumulate", lambda b: step(b, args.accumulate), batches, args.accumulate)
    else:
        accumulate = args.accumulate if args.child == "ftrain_accumulate" else 1
        step, train_step = ftrain_loop(model, args.backend, accumulate)
        row(args.child, step, batches if accumulate > 1 else one, accumulate)
        results[args.child]["num_compiles"] = train_step.num_compiles
        Path(args.result).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# The driver: jobs in child processes, each under a time limit, results written after each.


def run_process(cmd: list[str], timeout: float, log: Path, env: dict) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; ``(exit code or None if it ran past timeout, seconds)``."""
    start = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and all it started (compile workers, ranks)
            proc.wait()
            rc = None
    return rc, time.monotonic() - start


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def gpt_job(job: str, args: argparse.Namespace, timeout: float, env: dict) -> dict[str, dict]:
    result, log = args.out / f"{job}.json.part", args.out / f"{job}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--result", str(result)]
    cmd += ["--device", args.device, "--backend", args.backend, "--batch", str(args.batch)]
    cmd += ["--accumulate", str(args.accumulate), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--dry-run"] * args.dry_run
    rc, seconds = run_process(cmd, timeout, log, env)
    rows = json.loads(result.read_text()) if result.exists() else {}
    result.unlink(missing_ok=True)
    for name in JOB_ROWS[job]:
        if name not in rows:  # the job died or ran out of time before this row
            status = f"timed out after {seconds:.0f} s" if rc is None else f"failed (exit {rc})"
            rows[name] = {"name": ROWS[name].format(n=args.accumulate), "status": status, "error": tail(log)}
        rows[name].update(log=log.name, job_wall_s=seconds)
    return rows


DDP_LINE = re.compile(r"(Mesh\(.*?\)): val accuracy ([\d.]+)% \(loss ([\d.]+)\) after (\d+) steps")


def ddp_job(args: argparse.Namespace, timeout: float, env: dict) -> dict[str, dict]:
    log = args.out / "ddp.log"
    steps = 5 if args.dry_run else 200
    with tempfile.TemporaryDirectory(prefix="ftrain-gpu-ddp-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        cmd += [str(ROOT / "examples" / "ddp.py"), "--steps", str(steps), "--out", tmp]
        # Eager: the point here is torchrun, the process group and the mesh (a compiled step on CUDA is (b);
        # ddp.py's compiled step under torchrun has its own test), and the compile would cost the budget.
        cmd += ["--no-compile"]
        rc, seconds = run_process(cmd, timeout, log, {**env, "NCCL_DEBUG": "VERSION"})  # NCCL prints its version
    text = log.read_text(errors="replace")
    found = DDP_LINE.search(text)
    nccl = re.search(r"NCCL version ([\w.+-]+)", text)
    row: dict[str, object] = {
        "name": "examples/ddp.py --no-compile under torchrun --nproc-per-node 1",
        "status": "ok" if rc == 0 and found else ("timed out" if rc is None else f"failed (exit {rc})"),
        "wall_s": seconds,
        "backend": "nccl" if nccl else ("gloo" if args.device == "cpu" else "unknown"),
        "nccl_version": nccl.group(1) if nccl else None,
        "log": log.name,
    }
    if found:
        row.update(mesh=found.group(1), val_accuracy=float(found.group(2)) / 100, steps=int(found.group(4)))
    if row["status"] != "ok":
        row["error"] = tail(log)
    return {"ddp": row}


def environment(args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    name = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()})"
    )
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    elif cuda:
        peak = peak_tflops(name)
        source = "datasheet, dense bf16" if peak else "unknown GPU: pass --peak-tflops for MFU"
    else:
        peak, source = DRY_RUN_PEAK_TFLOPS, "nominal (dry run on CPU: MFU means nothing here)"
    return {
        "device": name,
        "device_type": args.device,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "ftrain": ftrain.__version__,
        "backend": args.backend,
        "peak_tflops": peak,
        "peak_source": source,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def add_rates(runs: dict[str, dict], flops: int, peak: float | None) -> None:
    for row in runs.values():
        if row.get("status") == "ok" and "step_s" in row:
            row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
            row["mfu"] = row["tokens_per_s"] * flops / (peak * 1e12) if peak else None


TARGETS = (  # the issue's: ftrain's step as fast as the plain loop, on no more memory (what, ours, theirs, field, op)
    ("tokens/s", "ftrain", "plain", "tokens_per_s", ">="),
    ("peak memory", "ftrain", "plain", "peak_memory_bytes", "<="),
    ("tokens/s", "ftrain_accumulate", "plain_accumulate", "tokens_per_s", ">="),
    ("peak memory", "ftrain_accumulate", "plain_accumulate", "peak_memory_bytes", "<="),
)
FRESH = ("plain", "ftrain", "ftrain_accumulate")  # rows whose first step is the untrained model's


def targets(runs: dict[str, dict]) -> list[dict]:
    out = []
    for what, ours, theirs, field, op in TARGETS:
        a, b = runs.get(ours, {}).get(field), runs.get(theirs, {}).get(field)
        known = a is not None and b is not None
        met = (a >= b if op == ">=" else a <= b) if known else None
        out.append({"target": f"{ours} {what} {op} {theirs}", "ratio": a / b if known and b else None, "met": met})
    for name in ("ftrain", "ftrain_accumulate"):
        row = runs.get(name, {})
        met = row["graphs"] == 1 and row["graph_breaks"] == 0 if row.get("status") == "ok" else None
        out.append({"target": f"{name}: 1 graph, 0 graph breaks", "ratio": None, "met": met})
    return out


def checks(report: dict, c: GPTConfig) -> dict[str, bool]:
    """What must hold for the run to count (the dry run fails unless all do)."""
    runs = report["runs"]
    expected = [row for job in report["jobs"] for row in JOB_ROWS.get(job, (job,))]
    out = {f"{name} ran": runs.get(name, {}).get("status") == "ok" for name in expected}
    ran = [name for name in expected if name in ROWS and out[f"{name} ran"]]
    first = {name: runs[name]["loss_first"] for name in ran if name in FRESH}
    if any(name.startswith("ftrain") for name in ran):
        out["ftrain's steps: one graph, no graph breaks"] = all(
            runs[n]["graphs"] == 1 and runs[n]["graph_breaks"] == 0 for n in ran if n.startswith("ftrain")
        )
    if ran:
        out["losses finite"] = all(math.isfinite(runs[n][k]) for n in ran for k in ("loss_first", "loss_last"))
    if first:  # random init gives near-uniform predictions
        out["initial loss near ln(vocab)"] = all(abs(x - math.log(c.vocab)) < 1.0 for x in first.values())
    if {"plain", "ftrain"} <= first.keys():  # same init, same first batch: the same model is compared
        out["plain and ftrain start from the same loss"] = abs(first["plain"] - first["ftrain"]) < 0.05
    return out


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
    env, runs, m = report["env"], report["runs"], report["model"]
    lines = [
        f"# GPT-2 small on one GPU: {m['layers']} layers x {m['width']}, context {m['context']}, "
        f"{m['params_non_embedding'] / 1e6:.2f}M params, bf16 autocast",
        "",
        f"{env['device']} · torch {env['torch']} · CUDA {env['cuda'] or '-'} · backend {env['backend']} · "
        f"peak {env['peak_tflops'] or '?'} TFLOP/s ({env['peak_source']}) · {report['started']} · "
        f"{report['wall_s']:.0f} s in all",
        "",
    ]
    if report["dry_run"]:
        lines += ["**Dry run** on CPU with a tiny model: these numbers are not a GPU measurement.", ""]
    lines += [
        "| config | tokens/step | tokens/s | MFU | step ms | peak memory | compile s | graphs / breaks | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        r = runs.get(name)
        if r is None:
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | - | - | - | - | - | - | - | {r['status']} |")
            continue
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(
            f"| {r['name']} | {r['tokens_per_step']:,} | {r['tokens_per_s']:,.0f} | {mfu} | {r['step_s'] * 1e3:.1f} | "
            f"{gib(r['peak_memory_bytes'])} | {r['compile_s']:.1f} | {r['graphs']} / {r['graph_breaks']} | ok |"
        )
    if "ddp" in runs:
        d = runs["ddp"]
        where = f"{d['mesh']}, {d['steps']} steps, val accuracy {d['val_accuracy']:.1%}, " if "mesh" in d else ""
        lines += ["", f"{d['name']}: {d['backend']}, {where}{d['wall_s']:.0f} s: {d['status']}"]
    lines += ["", "Targets:", ""]
    for t in report["targets"]:
        ratio = "" if t["ratio"] is None else f" ({t['ratio']:.2f}x)"
        lines.append(f"- {t['target']}: {'-' if t['met'] is None else 'met' if t['met'] else 'NOT met'}{ratio}")
    lines += ["", "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in report["checks"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu", help="gpu.json, gpu.md and logs go here")
    parser.add_argument("--dry-run", action="store_true", help="every path on CPU, tiny model, a few steps (CI)")
    parser.add_argument("--steps", type=int, default=None, help="timed steady steps per row (30; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (3; dry run 1)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (16; dry run 4)")
    parser.add_argument(
        "--accumulate", type=int, default=None, help="micro-batches per step in those rows (4; dry run 2)"
    )
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor; dry run aot_eager)")
    parser.add_argument("--budget", type=float, default=460.0, help="seconds for all jobs (each is cut off in time)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak, if its name is not known")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    parser.add_argument("--child", choices=JOB_ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    args.batch = args.batch or (4 if args.dry_run else 16)
    args.accumulate = args.accumulate or (2 if args.dry_run else 4)
    args.backend = args.backend or ("aot_eager" if args.dry_run else "inductor")
    if args.child:
        child(args)
        return 0

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); use --dry-run on CPU")
    # ftrain's steps run with deterministic algorithms by default, and cuBLAS then needs a fixed
    # workspace; it reads this when CUDA starts, so every job gets it from the environment.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    args.device = "cpu" if args.dry_run else "cuda"
    jobs = [j for j in args.jobs.split(",") if j]
    if not jobs or not set(jobs) <= set(JOBS):
        sys.exit(
            f"benchmarks/gpu.py: --jobs {args.jobs!r} names no job or an unknown one; choose from {','.join(JOBS)}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    c = TINY if args.dry_run else GPT2_SMALL
    with torch.device("meta"):  # (only counted: no memory, no init)
        n_params = non_embedding_params(GPT(c))
    flops = flops_per_token(c, n_params)
    env = environment(args)
    print(
        f"{env['device']} · torch {env['torch']} · CUDA {env['cuda']} · cuDNN {env['cudnn']} · python {env['python']}"
    )
    print(f"GPT {c} · {n_params / 1e6:.2f}M non-embedding params · {flops / 1e9:.3f} GFLOP/token", flush=True)

    report: dict = {
        "schema": 1,
        "dry_run": args.dry_run,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": 0.0,
        "env": env,
        "model": {**dataclasses.asdict(c), "params_non_embedding": n_params, "flops_per_token": flops},
        "settings": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "accumulate", "budget")},
        "jobs": jobs,
        "runs": {},
    }
    # ftrain's steps compile here, not load from an earlier run's step cache: a fresh one, removed after.
    with tempfile.TemporaryDirectory(prefix="ftrain-gpu-cache-") as step_cache:
        child_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "FTRAIN_CACHE_DIR": step_cache,
        }
        if args.dry_run:
            child_env["OMP_NUM_THREADS"] = "1"  # on a shared CPU, spinning OpenMP threads slow tiny steps 10-30x
        return run_jobs(report, jobs, args, c, flops, child_env)


def run_jobs(report: dict, jobs: list[str], args: argparse.Namespace, c: GPTConfig, flops: int, child_env: dict) -> int:
    """Run each job in its own process under the time left; 0 if every check holds."""
    start = time.monotonic()
    for i, job in enumerate(jobs):
        left = args.budget - (time.monotonic() - start) - RESERVE_S * (len(jobs) - i - 1)
        if left < 30:
            skipped = {"status": "skipped (out of time)"}
            names = JOB_ROWS.get(job, (job,))
            report["runs"].update({n: {"name": ROWS.get(n, n).format(n=args.accumulate), **skipped} for n in names})
        else:
            print(f"{job}: up to {left:.0f} s ...", flush=True)
            rows = ddp_job(args, left, child_env) if job == "ddp" else gpt_job(job, args, left, child_env)
            report["runs"].update(rows)
            for name, row in rows.items():
                print(f"  {name}: {row['status']}" + ("" if row["status"] == "ok" else f"\n{row.get('error', '')}"))
        write(report, args, c, flops, start)
    print("\n" + markdown(report))
    failed = [k for k, v in report["checks"].items() if not v]
    if failed:
        print(f"checks failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def write(report: dict, args: argparse.Namespace, c: GPTConfig, flops: int, start: float) -> dict:
    """Fill in rates, targets and checks and write both files (after every job: a crash loses nothing)."""
    report["wall_s"] = time.monotonic() - start
    add_rates(report["runs"], flops, report["env"]["peak_tflops"])
    report["targets"] = targets(report["runs"])
    report["checks"] = checks(report, c)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(main())
