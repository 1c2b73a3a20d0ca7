"""MLflow and W&B writers, for real: a local MLflow tracking server this module starts and stops, MLflow's
file store, and W&B offline, read back from the run's files. A resumed fit logs into the same run (#16)."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain import actions, writers

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")
pytestmark = pytest.mark.slow  # a tracking server, W&B's service process and a subprocess import

HPARAMS = {"lr": 0.1, "optim": {"name": "sgd"}}


# ---------------------------------------------------------------- a tiny run, resumed


def loss_fn(apply, params, buffers, batch, key):
    x, y = batch
    return torch.nn.functional.mse_loss(apply(params, buffers, x)[0], y)


def train(directory: Path, writer, num_steps: int, **fit_kwargs) -> list[dict]:
    """Fit a Linear(3, 1) to ``num_steps``, checkpointing every 2 steps in ``directory``, logging every step
    to ``writer`` and to a JSONL file (the reference the tracker must agree with); the JSONL records."""
    torch.manual_seed(0)
    state = ftrain.TrainState.create(torch.nn.Linear(3, 1), ftrain.optim.sgd(0.1))
    data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    jsonl = directory / f"metrics-to-{num_steps}.jsonl"
    with ftrain.CheckpointManager(directory / "ckpt", save_every=2, async_save=False) as manager:
        ftrain.fit(state, ftrain.make_train_step(loss_fn, compile=False), data, num_steps=num_steps,
                   checkpoint=manager, log=[writer, writers.JSONL(jsonl)], log_every=1, progress=False,
                   **fit_kwargs)  # fmt: skip
        saved = manager.metadata(manager.latest_step())["trackers"]
    writer.close()
    assert saved == {writer.tracker: writer.run_id}  # the run id travels with the checkpoint
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


# ---------------------------------------------------------------- MLflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free loopback port over a sqlite store; stopped (its process group) at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # creating the database takes tens of seconds on a loaded machine
        while True:
            assert proc.poll() is None, f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(uri + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (
                f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}"
            )
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(params=["server", "file store"])
def tracking_uri(request, tmp_path, monkeypatch):
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_logs_metrics_and_params_and_a_resumed_fit_continues_the_same_run(tmp_path, tracking_uri):
    experiment = f"ftrain-{tmp_path.name}"  # one experiment per test (the server is shared)
    first = writers.MLflow(experiment, tracking_uri=tracking_uri, run_name="tiny")
    before = train(tmp_path, first, 4, hparams={**HPARAMS, "num_steps": 4})
    with pytest.warns(RuntimeWarning, match=r"keeps its params \{'num_steps': \('4', '8'\)\}"):
        second = writers.MLflow(experiment, tracking_uri=tracking_uri)
        after = train(tmp_path, second, 8, hparams={**HPARAMS, "num_steps": 8, "seed": 0})
    assert second.run_id == first.run_id  # the checkpoint's run, not a new one

    client = mlflow.tracking.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params == {"lr": "0.1", "optim.name": "sgd", "num_steps": "4", "seed": "0"}
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert [s for s, _ in history] == list(range(1, 9))  # the steps continue across the resume
    assert history == pytest.approx(losses(before) + losses(after))
    assert {"train/grad_norm", "train/lr", "train/steps_per_sec"} <= set(run.data.metrics)


def test_mlflow_writes_text_and_images_as_artifacts(tmp_path, mlflow_server):
    writer = writers.MLflow(f"ftrain-{tmp_path.name}", tracking_uri=mlflow_server)
    writer.write_text(3, {"notes": "**hello**"})
    writer.write_images(3, {"samples": torch.rand(2, 1, 8, 8), "rgb": torch.rand(3, 4, 4)})
    writer.close()
    client = mlflow.tracking.MlflowClient(mlflow_server)
    assert [f.path for f in client.list_artifacts(writer.run_id, "notes")] == ["notes/step_3.md"]
    path = client.download_artifacts(writer.run_id, "notes/step_3.md", str(tmp_path))
    assert Path(path).read_text() == "**hello**"
    images = [f.path for f in client.list_artifacts(writer.run_id, "images")]
    keys = sorted({p.split("/", 1)[1].split("+step+")[0] for p in images})
    assert keys == ["rgb", "samples~0", "samples~1"]  # one per image of the batch (MLflow writes "/" as "~")
    assert len(images) == 3 * 2 and all("+step+3+" in p for p in images)  # each with its thumbnail, at step 3


# ---------------------------------------------------------------- W&B, offline


def wandb_records(path: str):
    """The records of a W&B transaction log (``run-<id>.wandb``): LevelDB's log format of ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    buf, block = Path(path).read_bytes(), 32768
    assert buf[:4] == b":W&B", buf[:7]
    pos, parts = 7, b""
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if (kind == 0 and n == 0) or pos + 7 + n > len(buf):  # the end, or a record still being written
            break
        parts, pos = parts + buf[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def finished_records(path: str, timeout: float = 60) -> list:
    """The records of a finished start: wandb-core writes the log from its own process, and may still be
    writing it when ``run.finish()`` has returned, so wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_run(directory: Path, run_id: str) -> tuple[list[dict], dict]:
    """The history rows and the config of every offline start of ``run_id``, in order."""
    rows, config = [], {}
    starts = sorted(glob.glob(str(directory / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    assert len(starts) == 2, starts  # the first fit and the resumed one, each a start of the same run
    for path in starts:
        for record in finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append(row := {})
                for item in record.history.item:  # a media value (a histogram) comes as (name, field) items
                    *outer, last = list(item.nested_key) or [item.key]
                    target = row
                    for key in outer:
                        target = target.setdefault(key, {})
                    target[last] = json.loads(item.value_json)
            elif kind in ("run", "config"):
                updates = record.run.config.update if kind == "run" else record.config.update
                config.update({u.key: json.loads(u.value_json) for u in updates if not u.key.startswith("_")})
    return rows, config


@pytest.fixture
def offline(monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)


def test_wandb_offline_logs_metrics_config_histograms_and_a_resumed_fit_continues_the_same_run(tmp_path, offline):
    first = writers.WandB("ftrain-test", dir=str(tmp_path))
    hist = [actions.Histograms(every=4, bins=8)]
    before = train(tmp_path, first, 4, hparams=HPARAMS, actions=hist)
    second = writers.WandB("ftrain-test", dir=str(tmp_path))
    after = train(tmp_path, second, 8, hparams={**HPARAMS, "num_steps": 8}, actions=hist)
    assert second.run_id == first.run_id

    rows, config = wandb_run(tmp_path, first.run_id)
    logged = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in logged] == list(range(1, 9))
    assert logged == pytest.approx(losses(before) + losses(after))
    assert config == {**HPARAMS, "num_steps": 8}
    histograms = {r["_step"]: r["params/weight"] for r in rows if "params/weight" in r}
    assert sorted(histograms) == [4, 8] and histograms[8]["_type"] == "histogram"
    assert sum(histograms[8]["values"]) == 3 and len(histograms[8]["bins"]) == 9  # Linear(3, 1): 3 weights


def test_wandb_offline_writes_images_and_text(tmp_path, offline):
    writer = writers.WandB("ftrain-test", dir=str(tmp_path))
    writer.write_images(3, {"samples": torch.rand(2, 1, 8, 8), "rgb": torch.rand(3, 4, 4)})
    writer.write_text(3, {"notes": "hello"})
    writer.close()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{writer.run_id}.wandb"))
    (row,) = [r for r in finished_records(path) if r.WhichOneof("record_type") == "history"]
    logged = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in row.history.item}
    assert logged["_step"] == 3 and logged["notes"] == "hello"
    assert logged["samples/_type"] == "images/separated" and logged["samples/count"] == 2
    assert logged["rgb/_type"] == "image-file" and (logged["rgb/width"], logged["rgb/height"]) == (4, 4)


def test_a_tracker_writer_refuses_a_checkpoint_of_another_run(tmp_path, offline):
    writer = writers.WandB("ftrain-test", run_id="run-a", dir=str(tmp_path))
    writer.resume("run-a")  # the same run: nothing to do
    with pytest.raises(ValueError, match="belongs to wandb run 'run-b', but this writer already logs to run 'run-a'"):
        writers.MultiWriter([writer]).resume_runs({"wandb": "run-b", "mlflow": "other"})
    assert repr(writer) == "writers.WandB(run_id='run-a')"


def test_importing_ftrain_imports_no_tracker():
    code = "import sys, ftrain, ftrain.writers; print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert out.stdout.strip() == "[]"
