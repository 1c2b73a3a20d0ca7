"""Checkpoint I/O of a ~1 GB TrainState: ftrain.CheckpointManager (orbax) side by side with torch.save/load.

    python benchmarks/checkpoint_io.py [--gb 1.0] [--repeats 3] [--dir /tmp/ftrain_ckpt_bench]

Measures, in one process, medians over ``--repeats`` rounds (each round times every method once, so
drift on a shared machine hits all of them alike):
  * sync save: torch.save of the state's tensors vs CheckpointManager(async_save=False).save
  * async save: how long save() blocks the training loop (staging copy, then the write goes on in
    the background), with copy=True (safe with donating steps; the default) and copy=False
  * restore: torch.load vs CheckpointManager.restore(into=template)
Targets (issue 6): async save blocks < 10% of a sync save; restore within 1.5x of torch.load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import ftrain


def make_state(gb: float) -> ftrain.TrainState:
    # params + Adam's mu and nu: three copies of the params, so params ~ gb / 3.
    n = int(gb * 2**30 / 4 / 3)
    width = 4096
    layers = max(1, n // (width * width))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    return ftrain.TrainState.create(model, ftrain.optim.adam(1e-3))


def state_bytes(state) -> int:
    return sum(x.numel() * x.element_size() for x in ftrain.tree.leaves(state) if isinstance(x, torch.Tensor))


def save_durably(obj, path) -> None:
    """torch.save, then fsync: on disk like an orbax checkpoint (tensorstore fsyncs what it writes)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def timed(fn, *args, **kwargs):
    # Flush the previous method's dirty pages first (untimed), so no method pays for another's writeback.
    os.sync()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/ftrain_ckpt_bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    state = make_state(args.gb)
    size = state_bytes(state)
    print(f"state: {size / 2**30:.2f} GiB in {len(ftrain.tree.leaves(state))} leaves, torch {torch.__version__}")
    flat = dict(zip(*ftrain.tree.flatten_with_path(state)[:2]))

    sync = ftrain.CheckpointManager(root / "sync", async_save=False, keep=1)
    copying = ftrain.CheckpointManager(root / "async_copy", keep=1)
    aliasing = ftrain.CheckpointManager(root / "async_nocopy", keep=1, copy=False)
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "torch.save",
            "torch.save+fsync",
            "sync save",
            "async blocks (copy)",
            "async total (copy)",
            "async blocks (no copy)",
            "torch.load",
            "restore",
        )
    }
    for r in range(1, args.repeats + 1):
        s = state.replace(step=torch.tensor(r))

        def async_copy(s=s):
            blocked, _ = timed(copying.save, s)
            rows["async blocks (copy)"].append(blocked)
            rows["async total (copy)"].append(blocked + timed(copying.wait)[0])

        def async_nocopy(s=s):
            rows["async blocks (no copy)"].append(timed(aliasing.save, s)[0])
            aliasing.wait()

        saves = [
            lambda: rows["torch.save"].append(timed(torch.save, flat, root / "torch.pt")[0]),
            lambda: rows["torch.save+fsync"].append(timed(save_durably, flat, root / "torch_synced.pt")[0]),
            lambda s=s: rows["sync save"].append(timed(sync.save, s)[0]),
            async_copy,
            async_nocopy,
        ]
        # Rotate the order each round: a write right after another one can pay for its writeback.
        for save in saves[r % len(saves) :] + saves[: r % len(saves)]:
            save()
        os.sync()
        rows["torch.load"].append(timed(torch.load, root / "torch.pt")[0])
        # The template gives the structure only: restore returns fresh tensors.
        t, restored = timed(sync.restore, into=state)
        rows["restore"].append(t)
        assert ftrain.tree.equal(restored.params, state.params), "restore is not bit-exact"
        del restored
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in rows.items()), flush=True)
    for m in (sync, copying, aliasing):
        m.close()

    med = {k: statistics.median(v) for k, v in rows.items()}
    gbs = size / 2**30
    print(f"\nmedians over {args.repeats} rounds ({gbs:.2f} GiB):")
    for k, v in med.items():
        print(f"  {k:24s} {v:7.3f} s   ({gbs / v:6.2f} GiB/s)")
    print("\nratios:")
    print(
        f"  sync save / torch.save                 {med['sync save'] / med['torch.save']:.2f}x   (torch.save leaves it in the page cache)"
    )
    print(
        f"  sync save / torch.save+fsync           {med['sync save'] / med['torch.save+fsync']:.2f}x   (both durable)"
    )
    print(
        f"  async blocks (copy) / sync save        {med['async blocks (copy)'] / med['sync save']:.1%}   (target < 10%)"
    )
    print(f"  async blocks (copy) / torch.save       {med['async blocks (copy)'] / med['torch.save']:.1%}")
    print(f"  async blocks (no copy) / sync save     {med['async blocks (no copy)'] / med['sync save']:.1%}")
    print(f"  restore / torch.load                   {med['restore'] / med['torch.load']:.2f}x   (target <= 1.5x)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
