"""benchmarks/gpu.py and the CUDA code paths, tested on CPU as far as a CPU can.

The script gets one try on a GPU, so the dry run here runs the very same jobs (the plain nanoGPT
loop, ftrain's donating step with and without accumulation, examples/ddp.py under torchrun) and
the checks below read what a GPU run would report. The last tests pin what ftrain does on a GPU
that a CPU can still see: which copies wait, and how a mesh binds NCCL to its GPU.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ftrain
from ftrain._batches import to_device

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
_spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
gpu = sys.modules["gpu_benchmark"] = importlib.util.module_from_spec(_spec)  # (dataclasses look it up)
_spec.loader.exec_module(gpu)

ROW_FIELDS = {
    "name", "status", "tokens_per_step", "micro_batches", "tokens_per_s", "mfu", "step_s", "first_step_s",
    "compile_s", "peak_memory_bytes", "graphs", "graph_breaks", "loss_first", "loss_last", "steps_timed", "log",
}  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").exists() else None
    return proc, report, out


@pytest.mark.slow
def test_the_dry_run_passes_every_check(dry_run):
    proc, report, _ = dry_run
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert report["dry_run"] is True
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    assert set(report["checks"]) >= {
        "ftrain's steps: one graph, no graph breaks",
        "plain and ftrain start from the same loss",
        "ddp ran",
    }


@pytest.mark.slow
def test_every_row_reports_throughput_mfu_memory_and_compile_time(dry_run):
    _, report, _ = dry_run
    assert set(report["runs"]) == {*gpu.ROWS, "ddp"}
    for name in gpu.ROWS:
        row = report["runs"][name]
        assert row["status"] == "ok", (name, row.get("error"))
        assert ROW_FIELDS <= set(row), (name, ROW_FIELDS - set(row))
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["compile_s"] >= 0
        assert row["peak_memory_bytes"] is None  # CPU: torch.cuda.max_memory_allocated is the GPU's
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    acc = report["settings"]["accumulate"]
    assert report["runs"]["ftrain_accumulate"]["tokens_per_step"] == acc * report["runs"]["ftrain"]["tokens_per_step"]
    assert set(report["env"]) >= {"device", "torch", "cuda", "peak_tflops", "peak_source", "CUBLAS_WORKSPACE_CONFIG"}


@pytest.mark.slow
def test_ftrains_steps_compile_to_one_graph_without_breaks(dry_run):
    _, report, _ = dry_run
    for name in ("ftrain", "ftrain_accumulate"):
        row = report["runs"][name]
        assert (row["graphs"], row["graph_breaks"], row["num_compiles"]) == (1, 0, 1), (name, row)


@pytest.mark.slow
def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak(dry_run):
    _, report, _ = dry_run
    flops, peak = report["model"]["flops_per_token"], report["env"]["peak_tflops"] * 1e12
    for name in gpu.ROWS:
        row = report["runs"][name]
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"])
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / peak)


@pytest.mark.slow
def test_the_ddp_example_trains_under_a_one_rank_torchrun(dry_run):
    _, report, out = dry_run
    ddp = report["runs"]["ddp"]
    assert ddp["status"] == "ok", ddp.get("error")
    assert (ddp["backend"], ddp["mesh"], ddp["steps"]) == ("gloo", "Mesh(dp=1, fsdp=1, cpu, rank 0/1)", 5)
    assert 0 < ddp["val_accuracy"] <= 1
    assert "val accuracy" in (out / ddp["log"]).read_text()


@pytest.mark.slow
def test_the_markdown_table_has_a_row_per_config_and_the_targets(dry_run):
    _, report, out = dry_run
    md = (out / "gpu.md").read_text()
    assert "**Dry run**" in md and report["env"]["device"] in md
    rows = [line for line in md.splitlines() if line.startswith("| (")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [report["runs"][n]["name"] for n in gpu.ROWS]
    assert all(r.rstrip().endswith("| ok |") and len(r.split("|")) == 11 for r in rows), rows
    assert re.search(r"under torchrun --nproc-per-node 1: gloo, Mesh\(.*\), 5 steps", md)
    for target in report["targets"]:
        assert f"- {target['target']}: " in md


def test_gpt2_small_is_nanogpts_124m_model():
    with torch.device("meta"):
        model = gpu.GPT(gpu.GPT2_SMALL)
    n = gpu.non_embedding_params(model)
    assert n == 123_587_328  # nanoGPT prints "number of parameters: 123.59M" for this config
    assert model.head.weight is model.tok.weight
    c = gpu.GPT2_SMALL
    assert gpu.flops_per_token(c, n) == 6 * n + 12 * 12 * 768 * 1024


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_flops_come_from_the_gpus_name(name, tflops):
    assert gpu.peak_tflops(name) == tflops


def test_a_job_past_its_time_is_killed_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    )
    # (10 s: time for two Python processes to start on a loaded machine)
    rc, seconds = gpu.run_process([sys.executable, "-c", spawn], 10.0, tmp_path / "job.log", dict(os.environ))
    assert rc is None and seconds < 60
    assert pid_file.exists(), (tmp_path / "job.log").read_text()
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would start the real run")
def test_without_a_gpu_the_script_says_to_use_the_dry_run(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device.*--dry-run"):
        gpu.main(["--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# CUDA paths a CPU can check.


class OnGPU(torch.Tensor):
    """A CPU tensor that reports ``cuda:0`` as its device and records the moves asked of it."""

    moves: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        if getattr(func, "__name__", None) == "to":
            cls.moves.append((args[1:], kwargs))
            return args[0].as_subclass(torch.Tensor)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def test_batches_go_to_a_gpu_without_waiting_and_come_back_to_the_host_waiting():
    OnGPU.moves.clear()
    to_device({"x": torch.ones(2).as_subclass(OnGPU)}, torch.device("cpu"))  # (e.g. evaluate on a CPU state)
    assert OnGPU.moves == [((torch.device("cpu"),), {"non_blocking": False})]  # the host reads it next

    moved = []

    class Host(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) == "to":
                moved.append((args[1:], kwargs or {}))
                return args[0].as_subclass(torch.Tensor)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    to_device((torch.ones(2).as_subclass(Host), 3), torch.device("cuda", 0))
    assert moved == [((torch.device("cuda", 0),), {"non_blocking": True})]  # overlaps the previous step


def test_a_cuda_mesh_binds_nccl_to_the_ranks_own_gpu(monkeypatch):
    calls = {}

    class Started(Exception):
        pass

    def init_process_group(backend, **kwargs):
        calls["init"] = (backend, kwargs)
        raise Started  # (the rest needs GPUs)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    with pytest.raises(Started):
        ftrain.Mesh.from_env(device_type="cuda")
    backend, kwargs = calls["init"]
    assert backend == "nccl" and calls["set_device"] == torch.device("cuda", 1)
    assert kwargs["device_id"] == torch.device("cuda", 1)
