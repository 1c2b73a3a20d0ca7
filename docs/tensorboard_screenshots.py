"""Make docs/tensorboard-scalars.png and docs/tensorboard-histograms.png, the screenshots on the loop page.

It trains the digits MLP for 800 eager steps with the TensorBoard writer and the Histograms action
(params and the gradients of a probe batch), serves the log directory with ``tensorboard`` on a
loopback port, and screenshots the scalars and histograms pages with headless chromium
(Debian: ``apt-get install chromium``)::

    python docs/tensorboard_screenshots.py            # writes the two PNGs into docs/
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ftrain
from ftrain import optim, schedules

PAGES = {"tensorboard-scalars.png": "scalars", "tensorboard-histograms.png": "histograms&tagFilter=weight"}


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    logits, buffers = apply(params, buffers, x, key=key)
    return F.cross_entropy(logits, y), {"acc": ftrain.metrics.accuracy(logits, y)}, buffers


def train(logdir: Path, num_steps: int = 800) -> None:
    torch.manual_seed(0)
    train, val = ftrain.datasets.digits("train"), ftrain.datasets.digits("val")
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10))
    tx = optim.adamw(schedules.warmup_cosine_decay(0.0, 3e-3, num_steps // 20, num_steps), weight_decay=1e-2)
    val_loader = ftrain.data.Loader(val, len(val), shuffle=False)
    histograms = ftrain.actions.Histograms(every=50, bins=30, loss_fn=loss_fn, batch=next(iter(val_loader)))
    tb = ftrain.writers.TensorBoard(logdir / "digits")
    ftrain.fit(
        ftrain.TrainState.create(model, tx),
        ftrain.make_train_step(loss_fn, compile=False),
        ftrain.data.Loader(train, 64, seed=0),
        num_steps=num_steps,
        eval_step=ftrain.make_eval_step(loss_fn, compile=False),
        eval_data=val_loader,
        eval_every=50,
        log=tb,
        log_every=10,
        progress=False,
        actions=[histograms],
    )
    tb.close()


def screenshot(logdir: Path, out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(1)
        for name, page in PAGES.items():
            chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={out / name}", "--window-size=1400,900", "--virtual-time-budget=20000"]  # fmt: skip
            subprocess.run(
                [*chromium, f"http://127.0.0.1:{port}/#{page}"], check=True, capture_output=True, timeout=300
            )
            print(out / name, f"{(out / name).stat().st_size / 1024:.0f} KiB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="ftrain-tb-") as logdir:
        train(Path(logdir))
        screenshot(Path(logdir), Path(__file__).resolve().parent)
