"""ftrain.Mesh and ShardedCheckpointManager: 2-process gloo runs (torchrun) and 1-process checks.

The multi-process runs are few and shared: one ``main`` launch (data parallel, sharded,
sharded checkpoints, single-process reference), one ``errors`` launch, and a killed launch
followed by its resume. Each launch has a hard timeout that kills its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint import CheckpointMismatchError
from ftrain.mesh import Mesh, ShardedCheckpointManager

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mesh_worker.py"
sys.path.insert(0, str(WORKER.parent))
import mesh_worker  # noqa: E402

pytestmark = pytest.mark.slow


def torchrun(*args: str, script: Path = WORKER, timeout: float = 240.0) -> tuple[int, str, float]:
    """Run ``torchrun --nproc-per-node 2 script *args``; (exit code, output, seconds). Never hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung past {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - start


def tensors(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(ftrain.tree.leaves(a), ftrain.tree.leaves(b)))


@pytest.fixture(scope="session")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh_main")
    rc, log, _ = torchrun("main", "--out", str(out))
    assert rc == 0, log[-4000:]
    return out


# ---------------------------------------------------------------- 2 processes


def test_data_parallel_equals_single_process_and_ranks_stay_bitwise_identical(main_run):
    rank0, rank1 = tensors(main_run / "dp_rank0.pt"), tensors(main_run / "dp_rank1.pt")
    single = tensors(main_run / "single.pt")
    assert int(rank0["step"]) == mesh_worker.STEPS
    assert ftrain.tree.equal(rank0, rank1)  # bitwise: params and optimizer state
    assert max_diff(rank0, single) <= 1e-6  # 2 ranks x 8 rows == 1 process x 16 rows


def _chunks(step_dir: Path) -> dict[str, list[str]]:
    """For each saved leaf, the data files its chunks were written to (from DCP's .metadata)."""
    import torch.distributed.checkpoint as dcp

    chunks: dict[str, list[str]] = {}
    for index, info in dcp.FileSystemReader(str(step_dir)).read_metadata().storage_data.items():
        chunks.setdefault(index.fqn, []).append(info.relative_path)
    return chunks


def test_replicated_checkpoint_is_written_once(main_run):
    state = tensors(main_run / "dp_rank0.pt")
    replicated = _chunks(main_run / "dp_ckpt" / str(mesh_worker.STEPS))
    assert all(len(files) == 1 for files in replicated.values())  # one copy, not one per rank
    assert {f for files in replicated.values() for f in files} == {"__0_0.distcp", "__1_0.distcp"}  # spread out
    sharded = _chunks(main_run / "ckpt" / str(mesh_worker.STEPS))
    assert sorted(sharded["params['0.weight']"]) == ["__0_0.distcp", "__1_0.distcp"]  # each rank its shard
    restored, _ = ShardedCheckpointManager(main_run / "dp_ckpt", async_save=False).restore_latest(
        mesh_worker.make_state(seed=3)
    )
    assert ftrain.tree.equal({"params": restored.params, "opt_state": restored.opt_state}, {
        "params": state["params"], "opt_state": state["opt_state"]
    })  # fmt: skip


def test_sharded_run_equals_replicated_run(main_run):
    report = json.loads((main_run / "main_rank0.json").read_text())
    assert set(report["placements"].values()) == {"(Replicate(), Shard(dim=0))"}
    sharded0, sharded1 = tensors(main_run / "fsdp_rank0.pt"), tensors(main_run / "fsdp_rank1.pt")
    replicated = tensors(main_run / "dp_rank0.pt")
    assert ftrain.tree.equal(sharded0, sharded1)
    assert max_diff(sharded0, replicated) <= 1e-6
    assert report["compiles"] == {"dp": 1, "fsdp": 1}  # one graph each, no recompiles over 6 steps


def test_sharded_state_donates_into_its_shards(main_run):
    for rank in (0, 1):
        report = json.loads((main_run / f"main_rank{rank}.json").read_text())
        assert report["donate_equal"], "donating step on DTensor shards differs from the pure step"
        assert report["donate_in_place"], "donating step did not write into the input shards"


def test_sharded_checkpoint_restores_on_two_ranks(main_run):
    for rank in (0, 1):
        report = json.loads((main_run / f"main_rank{rank}.json").read_text())
        assert report["restored_equal"] is True
        assert report["restored_kinds"] == ["DTensor"]  # restored into the template's shards
        assert report["extras"]["data"] == {"seed": 0, "epoch": 2, "batch": 0, "size": 48}  # 6 steps = 2 epochs
        assert report["steps_on_disk"] == [4, 6]  # keep=2 rotated step 2 away


def test_sharded_checkpoint_restores_on_one_process(main_run):
    template = mesh_worker.make_state(seed=3)  # plain tensors, no process group
    manager = ShardedCheckpointManager(main_run / "ckpt", async_save=False)
    restored, extras = manager.restore_latest(template)
    expected = tensors(main_run / "fsdp_rank0.pt")
    assert ftrain.tree.equal({"params": restored.params, "opt_state": restored.opt_state}, {
        "params": expected["params"], "opt_state": expected["opt_state"]
    })  # fmt: skip
    assert int(restored.step) == mesh_worker.STEPS and extras["step"] == mesh_worker.STEPS
    assert not ftrain.tree.equal(template.params, restored.params)  # the template is untouched


@pytest.fixture(scope="session")
def errors_run(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("mesh_errors")
    rc, log, _ = torchrun("errors", "--out", str(out), timeout=120)
    assert rc == 0, log[-4000:]
    return [json.loads((out / f"errors_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_metrics_are_reduced_across_ranks_when_read(errors_run):
    for report in errors_run:
        assert report["reduced"] == {"rank": 0.5, "one": 1.0}


def test_step_metrics_are_the_mean_over_ranks(main_run):
    # Each rank sees its own half of the batch; the step's loss is averaged with the gradients.
    losses = [json.loads((main_run / f"main_rank{r}.json").read_text())["local_loss"] for r in (0, 1)]
    assert losses[0] == losses[1]


def test_batchnorm_running_stats_are_averaged_over_ranks(main_run):
    rank0, rank1 = tensors(main_run / "bn_rank0.pt"), tensors(main_run / "bn_rank1.pt")
    assert ftrain.tree.equal(rank0["stepped"], rank1["stepped"]), "ranks' BatchNorm stats diverged"
    for name in ("1.running_mean", "1.running_var"):  # each rank's own update differs: its own slice
        assert not torch.equal(rank0["own"][name], rank1["own"][name])
        mean = (rank0["own"][name] + rank1["own"][name]) / 2
        torch.testing.assert_close(rank0["stepped"][name], mean, rtol=1e-6, atol=1e-7)
    tracked = rank0["stepped"]["1.num_batches_tracked"]
    assert tracked.dtype == torch.int64 and int(tracked) == 1  # a counter: kept, not averaged


def test_pmean_averages_each_float_leaf_and_keeps_counters(errors_run):
    for rank, report in enumerate(errors_run):
        assert report["pmean"] == {
            "a": [[0.5, 1.0], "torch.float32"],
            "b": [1.5, "torch.float64"],
            "n": [rank, "torch.int64"],
        }
        assert report["pmean_empty"] == [[1.0], {}]


def test_bad_inputs_fail_clearly_on_every_rank(errors_run):
    for report in errors_run:
        assert "dp=3 x fsdp=1 = 3 ranks, but the job has world size 2" in report["mesh_size"]
        assert "--nproc-per-node 3" in report["mesh_size"]
        assert "global batch of 15 rows cannot be split evenly over 2" in report["batch"]
        assert "multiple of 2" in report["batch"]
        assert "params['0.weight']" in report["placement"] and "mesh.shard(state)" in report["placement"]
        assert "params['0.weight'] is a DTensor on DeviceMesh((other=2)" in report["placement_step"]
        assert "nothing to shard over" in report["shard_axis"]


def test_killed_rank_fails_loudly_then_resumes_from_last_complete_checkpoint(main_run, tmp_path):
    timeout = 180.0
    rc, log, seconds = torchrun("train", "--out", str(tmp_path), "--kill-at", "5", timeout=timeout)
    assert rc != 0 and seconds < timeout
    assert "ChildFailedError" in log or "Connection reset" in log or "Connection closed" in log, log[-3000:]
    assert not (tmp_path / "final_rank0.pt").exists()
    ckpt = tmp_path / "ckpt"
    latest = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "ftrain.json").is_file())
    assert latest in (2, 4)  # 4 only if its async commit beat the kill
    rc, log, _ = torchrun("train", "--out", str(tmp_path))
    assert rc == 0, log[-4000:]
    for rank in (0, 1):
        assert int((tmp_path / f"start_rank{rank}.txt").read_text()) == latest
        resumed = tensors(tmp_path / f"final_rank{rank}.pt")
        assert ftrain.tree.equal(resumed, tensors(main_run / "fsdp_rank0.pt"))  # bitwise, as if never killed
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # the half-written save was cleaned up


def test_ddp_example_runs_under_torchrun_with_inductor():
    # The one inductor-compiled multi-process run; the numerics above use aot_eager (faster to compile).
    rc, log, _ = torchrun("--smoke", script=ROOT / "examples" / "ddp.py", timeout=400)
    assert rc == 0, log[-4000:]
    assert log.count("val accuracy") == 1 and "Mesh(dp=2, fsdp=1, cpu, rank 0/2)" in log  # rank 0 alone prints
    assert log.count("step 5 |") == 1  # and alone logs


# ---------------------------------------------------------------- 1 process, no process group


def test_local_mesh_is_the_identity():
    mesh = Mesh.from_env()
    assert mesh.size == 1 and mesh.rank == 0 and mesh.is_main and not mesh.is_distributed
    assert mesh.shape == {"dp": 1, "fsdp": 1}
    grads = {"w": torch.randn(3), "b": torch.randn(1, dtype=torch.float64)}
    assert mesh.pmean(grads) is grads
    assert mesh.gather(grads)["w"] is grads["w"]
    batch = {"x": torch.arange(6), "y": torch.arange(6) * 2}
    assert ftrain.tree.equal(mesh.shard_batch(batch), batch)
    assert mesh.loader_kwargs() == {"rank": 0, "world_size": 1}
    assert mesh.reduce_metrics({"loss": torch.tensor(0.25)}) == {"loss": 0.25}


def test_local_mesh_rejects_sizes_it_cannot_have():
    with pytest.raises(ValueError, match=r"dp=2 x fsdp=1 = 2 ranks, but the job has world size 1"):
        Mesh.from_env(dp=2)
    with pytest.raises(ValueError, match="must be a positive int"):
        Mesh.from_env(fsdp=0)
    with pytest.raises(ValueError, match="nothing to shard over"):
        Mesh.local().shard(mesh_worker.make_state(seed=0))
    with pytest.raises(ValueError, match="unknown mesh axis 'tp'"):
        Mesh.local().axis_size("tp")


def test_shard_batch_checks_batch_dims():
    mesh = Mesh.local()
    with pytest.raises(ValueError, match="disagree on their batch size"):
        mesh.shard_batch((torch.zeros(4, 2), torch.zeros(5)))
    with pytest.raises(ValueError, match="no tensor with a batch dim"):
        mesh.shard_batch({"n": 3})


def _state_at(state, step: int):
    return state.replace(step=torch.tensor(step), params=ftrain.tree.map(lambda p: p + step, state.params))


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_keep_last_and_resume_position(tmp_path, async_save):
    state = mesh_worker.make_state(seed=0)
    manager = ShardedCheckpointManager(tmp_path, keep=2, save_every=2, async_save=async_save)
    assert [s for s in range(7) if manager.should_save(s)] == [2, 4, 6]
    for step in (2, 4, 6):
        assert manager.save(_state_at(state, step), data={"epoch": 0, "batch": step})
    assert not manager.save(_state_at(state, 6))  # already committed
    assert not manager.save(_state_at(state, 7))  # off the save_every schedule
    manager.wait()
    assert manager.all_steps() == [4, 6]
    restored, extras = manager.restore_latest(state)
    assert ftrain.tree.equal(restored.params, _state_at(state, 6).params)
    assert extras["data"] == {"epoch": 0, "batch": 6} and int(restored.step) == 6
    assert manager.save(_state_at(state, 7), force=True)  # e.g. the loop's save at the end
    manager.close()
    assert manager.all_steps() == [6, 7]


def test_checkpoint_keep_best_and_latest(tmp_path):
    state = mesh_worker.make_state(seed=0)
    manager = ShardedCheckpointManager(tmp_path, keep=1, best="val/loss", keep_best=2, async_save=False)
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.9), (4, 0.3), (5, 0.8)):
        manager.save(_state_at(state, step), metrics={"val/loss": loss})
    assert manager.all_steps() == [2, 4, 5]  # the 2 best, and the newest for resuming


def test_checkpoint_ignores_and_cleans_an_uncommitted_save(tmp_path):
    state = mesh_worker.make_state(seed=0)
    ShardedCheckpointManager(tmp_path, async_save=False).save(_state_at(state, 2))
    (tmp_path / "4.tmp").mkdir()  # a save killed mid-way: data files, no commit
    (tmp_path / "4.tmp" / "__0_0.distcp").write_bytes(b"partial")
    manager = ShardedCheckpointManager(tmp_path, async_save=False)
    assert manager.latest_step() == 2 and not (tmp_path / "4.tmp").exists()
    assert int(manager.restore_latest(state)[0].step) == 2


def test_checkpoint_restore_into_a_different_state_names_the_leaf(tmp_path):
    manager = ShardedCheckpointManager(tmp_path, async_save=False)
    manager.save(mesh_worker.make_state(seed=0))
    wider = ftrain.TrainState.create(torch.nn.Sequential(torch.nn.Linear(8, 64)), ftrain.optim.sgd(0.1))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"params\['0\.(bias|weight)'\]: checkpoint \(32,?( 8)?\) float32 vs template \(64",
    ):
        manager.restore_latest(wider)
    assert ShardedCheckpointManager(tmp_path / "empty", async_save=False).restore_latest(wider) is None
