"""ftrain.data.Loader: order fixed by (seed, epoch), exact resume, per-rank sharding, workers."""

import pytest
import torch

from ftrain.data import Loader, epoch_order


class Items(torch.utils.data.Dataset):
    """Item i is (x_i, i): batches carry the ids of the items they hold."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i


def ids(loader) -> list[list[int]]:
    return [batch[1].tolist() for batch in loader]


def test_order_is_a_pure_function_of_seed_and_epoch_and_ignores_the_global_rng():
    rng = torch.random.get_rng_state()
    torch.manual_seed(123)
    a = ids(Loader(Items(50), 8, seed=7))
    torch.manual_seed(999)
    b = ids(Loader(Items(50), 8, seed=7))
    assert a == b
    assert torch.equal(epoch_order(50, 7, 0), epoch_order(50, 7, 0))
    assert not torch.equal(epoch_order(50, 7, 0), epoch_order(50, 7, 1))
    assert not torch.equal(epoch_order(50, 7, 0), epoch_order(50, 8, 0))
    torch.manual_seed(123)
    ids(Loader(Items(50), 8, seed=7))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3)), "iterating the loader advanced the global RNG"
    torch.random.set_rng_state(rng)


def test_epochs_are_permutations_and_len_counts_batches():
    loader = Loader(Items(50), 8, seed=1, drop_last=False)
    assert len(loader) == 7
    for epoch in range(3):
        batches = ids(loader)
        assert [len(b) for b in batches] == [8] * 6 + [2]
        assert sorted(sum(batches, [])) == list(range(50))
        assert loader.state_dict() == {"seed": 1, "epoch": epoch + 1, "batch": 0, "size": 50}
    dropped = Loader(Items(50), 8, seed=1)
    assert len(dropped) == 6 and [len(b) for b in ids(dropped)] == [8] * 6
    assert ids(Loader(Items(6), 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5]]


def test_resume_from_any_position_sees_exactly_the_remaining_batches():
    reference = Loader(Items(30), 4, seed=3)
    expected = [b for _ in range(3) for b in ids(reference)]  # 3 epochs of 7 batches
    for stop in [0, 1, 6, 7, 8, 13, 20]:
        run = Loader(Items(30), 4, seed=3)
        seen, it = [], None
        while len(seen) < stop:  # consume `stop` batches, across epoch boundaries
            it = iter(run) if it is None else it
            try:
                seen.append(next(it)[1].tolist())
            except StopIteration:
                it = None
        position = run.state_dict()
        resumed = Loader(Items(30), 4, seed=3)
        resumed.load_state_dict(position)
        while len(seen) < len(expected):
            seen += ids(resumed)
        assert seen == expected, f"resume after {stop} batches diverged"


def test_ranks_split_each_global_batch_into_disjoint_slices():
    global_batches = ids(Loader(Items(40), 8, seed=5))
    per_rank = [ids(Loader(Items(40), 8, seed=5, rank=r, world_size=4)) for r in range(4)]
    for b, whole in enumerate(global_batches):
        parts = [per_rank[r][b] for r in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == whole


# jax (imported by other test files' CheckpointManager) warns on every fork; the workers never touch jax.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_worker_processes_give_the_same_batches_and_resume():
    ds = Items(24)
    assert ids(Loader(ds, 4, seed=2, num_workers=2)) == ids(Loader(ds, 4, seed=2))
    loader = Loader(ds, 4, seed=2, num_workers=2)
    loader.load_state_dict({"epoch": 1, "batch": 2})
    assert ids(loader) == Loader(ds, 4, seed=2).batch_indices(1)[2:]


def test_bad_arguments_and_foreign_positions_are_refused():
    with pytest.raises(TypeError, match="map-style dataset"):
        Loader(iter(range(5)), 2)
    with pytest.raises(ValueError, match="batch_size=10, world_size=4"):
        Loader(Items(40), 10, world_size=4)
    with pytest.raises(ValueError, match="rank must be in"):
        Loader(Items(40), 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Loader(Items(3), 4)
    with pytest.raises(TypeError, match="seed must be an int"):
        Loader(Items(8), 4, seed=1.5)
    loader = Loader(Items(40), 8, seed=0)
    with pytest.raises(ValueError, match="seed=1"):
        loader.load_state_dict({"seed": 1, "epoch": 0, "batch": 0})
    with pytest.raises(ValueError, match="dataset of 41 items"):
        loader.load_state_dict({"seed": 0, "epoch": 0, "batch": 0, "size": 41})
    with pytest.raises(ValueError, match="past the end"):
        loader.load_state_dict({"epoch": 0, "batch": 9})
    with pytest.raises(ValueError, match="keys 'epoch' and 'batch'"):
        loader.load_state_dict({"step": 3})


def test_tuple_items_give_tuple_batches_like_a_hand_made_batch():
    # A compiled step guards on the batch's structure: a hand-made (x, y) and the loader's batch must match.
    ds = torch.utils.data.TensorDataset(torch.arange(8.0), torch.arange(8))
    x, y = next(iter(Loader(ds, 4, shuffle=False)))
    batch = next(iter(Loader(ds, 4, shuffle=False)))
    assert type(batch) is tuple and torch.equal(x, torch.arange(4.0)) and torch.equal(y, torch.arange(4))
    dicts = [{"a": torch.tensor(i)} for i in range(4)]
    assert torch.equal(next(iter(Loader(dicts, 4, shuffle=False)))["a"], torch.arange(4))


def test_digits_are_scikit_learns_digits_read_without_importing_scikit_learn():
    import subprocess
    import sys

    probe = (
        "import sys, ftrain.datasets as d; d.digits('test'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # seconds of imports saved at every start

    from sklearn.datasets import load_digits

    from ftrain import datasets

    bunch = load_digits()
    x, y = datasets.digits("train", seed=0, normalize=False).tensors
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(0))[: len(y)]
    assert torch.equal(x, torch.as_tensor(bunch.data, dtype=torch.float32)[order])
    assert torch.equal(y, torch.as_tensor(bunch.target, dtype=torch.int64)[order])
