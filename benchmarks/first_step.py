"""Time to the first finished training step, from process start: cold and warm, beside plain PyTorch.

For each model (the digits MLP of examples/digits.py, the char-LM of examples/char_lm.py, a tiny
random-init transformers BERT) it starts fresh processes that build the model and run one step:

* ``torch``: a plain PyTorch loop (``torch.optim.AdamW``, eager), the reference;
* ``ftrain cold``: ``make_train_step(loss_fn)`` with empty cache directories (ftrain's and
  inductor's), so everything is compiled;
* ``ftrain warm``: the same again, the caches now filled by the cold run.

"Fresh" includes the system temp dir, where inductor keeps its precompiled C++ header (``TMPDIR``).
Each time is wall clock from just before the process is started to the first step's loss on the
host; "after import" starts when ``import ftrain`` returned. Beside it, the CPU seconds the process
and its children (the C++ compiler) had used by then: steadier than wall time on a shared machine.
Then the README's main command (``python examples/digits.py``, a full run into a fresh output
directory) cold and warm, wall and CPU. ``--repeat N`` runs every row N times (fresh cache
directories for each cold run) and prints medians.

Run: ``python benchmarks/first_step.py [--models digits char_lm bert] [--no-readme] [--threads 2] [--repeat 1]``.
Every run uses fresh temporary cache directories, so it never touches your own cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits", "char_lm", "bert")
MODES = (("torch (eager loop)", "torch"), ("ftrain cold", "ftrain"), ("ftrain warm", "ftrain"))  # in this order


# ----------------------------------------------------------------------------------------------
# The child: build one model, run one step, report when things happened.


def build(name: str):
    """``(model, loss_fn, batch)`` for one of MODELS (imports torch and the example lazily)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    torch.manual_seed(0)
    if name == "digits":
        import digits

        batch = (torch.randn(64, 64), torch.randint(0, 10, (64,)))
        return digits.make_model(0.2), digits.loss_fn, batch
    if name == "char_lm":
        import char_lm

        vocab, seq_len = 96, 128
        model = char_lm.CharTransformer(vocab, seq_len, dim=128, layers=3, heads=4, dropout=0.1)
        batch = (torch.randint(0, vocab, (16, seq_len)), torch.randint(0, vocab, (16, seq_len)))
        return model, char_lm.loss_fn, batch
    if name == "bert":
        import transformers

        config = transformers.BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=64, num_labels=2,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
        batch = (torch.randint(0, 1000, (8, 32)), torch.randint(0, 2, (8,)))
        return model, bert_loss, batch
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def bert_loss(apply, params, buffers, batch, key):
    import torch.nn.functional as F

    x, y = batch
    out, buffers = apply(params, buffers, input_ids=x, key=key)
    return F.cross_entropy(out.logits, y), {}, buffers


def child(name: str, mode: str) -> dict:
    if mode == "torch":
        import torch

        model, loss_fn, batch = build(name)
        imported = time.time()
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

        def apply(p, b, *args, key=None, **kwargs):  # the same loss_fn, on the live module
            return model(*args, **kwargs), b

        loss = loss_fn(apply, params, buffers, batch, None)[0]
        loss.backward()
        opt.step()
        return {"imported": imported, "done": time.time(), "cpu": _cpu(), "loss": float(loss), "compiles": 0}
    import ftrain  # noqa: I001  (timed: "after import" starts here)

    imported = time.time()
    import torch

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    model, loss_fn, batch = build(name)
    state = ftrain.TrainState.create(model, ftrain.optim.adamw(1e-3), key=ftrain.random.key(0))
    train_step = ftrain.make_train_step(loss_fn)
    state, metrics = train_step.donate(state, batch)  # the form fit runs
    loss = float(metrics["loss"])
    return {"imported": imported, "done": time.time(), "cpu": _cpu(), "loss": loss, "compiles": train_step.num_compiles}


def _cpu() -> float:
    """CPU seconds this process and its finished children (compilers, compile workers) have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------------------------
# The parent: fresh processes, fresh cache directories.


def run(args: list[str], env: dict) -> tuple[float, float, dict | None]:
    """``(wall s, CPU s of the process and its children, the child's report)`` of one fresh process."""
    before, start = os.times(), time.time()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    wall, after = time.time() - start, os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else None
    if report is not None:
        report["from_start"] = report["done"] - start
        report["after_import"] = report["done"] - report["imported"]
    return wall, cpu, report


def cache_env(directory: Path, threads: int) -> dict:
    (directory / "tmp").mkdir(exist_ok=True)
    return {
        **os.environ,
        "FTRAIN_CACHE_DIR": str(directory / "ftrain"),
        "TORCHINDUCTOR_CACHE_DIR": str(directory / "inductor"),  # (plain torch.compile's cache: fresh too)
        # Inductor keeps its precompiled C++ header in the system temp dir whatever the cache dir:
        # a fresh one, or a cold run would reuse the header an earlier run built (~6 CPU s).
        "TMPDIR": str(directory / "tmp"),
        "BENCH_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-readme", action="store_true", help="skip the README command's cold and warm runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs of every row; medians are printed")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import torch

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    rows = []
    for name in args.models:
        runs: dict[str, list[tuple]] = {}
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="ftrain-first-step-") as tmp:  # (fresh caches: a cold run)
                env = cache_env(Path(tmp), args.threads)
                for label, mode in MODES:
                    _, _, r = run([__file__, "--child", name, mode], env)
                    runs.setdefault(label, []).append((r["from_start"], r["after_import"], r["cpu"], r["compiles"]))
                    print(f"  {name:8s} {label:20s} {r['from_start']:7.2f} s, CPU {r['cpu']:7.2f} s", flush=True)
        rows += [(name, label, *_medians(values)) for label, values in runs.items()]
    if not args.no_readme:
        runs = {}
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="ftrain-first-step-") as tmp:
                env = cache_env(Path(tmp), args.threads)
                for label in ("cold", "warm"):
                    out = Path(tmp) / f"run-{label}"  # a fresh output directory: a full run, not a resume
                    wall, cpu, _ = run(["examples/digits.py", "--out", str(out)], env)
                    runs.setdefault(label, []).append((wall, None, cpu, None))
                    print(f"  README {label}: {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
        rows += [("README", f"python examples/digits.py, {label}", *_medians(v)) for label, v in runs.items()]

    print(f"\n(medians of {args.repeat} run(s); load average at the end {os.getloadavg()[0]:.1f})")
    print("| model | run | first step from process start | after `import ftrain` | CPU s by then | compiles |")
    print("|---|---|---|---|---|---|")
    for name, label, from_start, after_import, cpu, compiles in rows:
        after = "" if after_import is None or label.startswith("torch") else f"{after_import:.2f} s"
        count = "" if compiles is None else str(compiles)
        print(f"| {name} | {label} | {from_start:.2f} s | {after} | {cpu:.1f} | {count} |")


def _medians(values: list[tuple]) -> tuple:
    """The median of each column of ``values`` (a column of ``None`` stays ``None``; counts take the last)."""
    cols = list(zip(*values))
    return tuple(
        None if col[0] is None else col[-1] if i == 3 else statistics.median(col) for i, col in enumerate(cols)
    )


if __name__ == "__main__":
    main()
