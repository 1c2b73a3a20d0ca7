"""The persistent compiled-step cache: served across processes, keyed so it never goes stale, safe under faults.

Compiles are what cost here, so one pair of fresh processes (tests/cache_worker.py, started at
once on an empty cache) compiles the tiny step once for the whole module; the other tests read
that cache (or a copy), and the invalidation tests compare keys, which is what a lookup goes by.
"""

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import cache_worker
import pytest
import torch

import ftrain
from ftrain._step import _cache, _compiled
from ftrain._step._cache import CachedCompile, Unfingerprintable, cache_dir, fingerprint, step_key_of
from ftrain._step._dynamo import Scoped

WORKER = str(Path(__file__).with_name("cache_worker.py"))
pytestmark = pytest.mark.slow


def start_worker(directory: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "FTRAIN_CACHE_DIR": str(directory)}
    return subprocess.Popen([sys.executable, WORKER, str(out)], env=env, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two fresh processes building the same step at the same time on an empty cache."""
    root = tmp_path_factory.mktemp("cache")
    directory = root / "ftrain"
    procs = [start_worker(directory, root / f"run{i}.pt") for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    runs = [torch.load(root / f"run{i}.pt") for i in range(2)]
    return directory, runs, errors


@contextlib.contextmanager
def step_mode():
    """What a compiled step runs under, so a key computed here is the step's own."""
    with torch.no_grad():
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(False)


def key_of(**changes) -> str:
    state, batches = cache_worker.build(**changes)
    core = ftrain.make_train_step(cache_worker.loss_fn, compile=False).core
    with step_mode():
        return step_key_of(core, (state, batches[0]), {"backend": "inductor"})


# -- Served across processes ------------------------------------------------------------------


def test_a_second_process_serves_the_step_from_the_cache_and_ends_bitwise_equal(two_runs):
    _, runs, _ = two_runs
    assert sorted(r["compiles"] for r in runs) == [0, 1]  # one compiled, the other did no compile
    assert ftrain.tree.equal(runs[0]["params"], runs[1]["params"])  # bitwise, against a fresh compile


def test_two_processes_compiling_one_key_at_once_wait_for_one_compile_and_read_no_torn_file(two_runs):
    directory, _, errors = two_runs
    assert not any("could not be used" in err for err in errors)  # neither read a partial file
    files = [f for f in (directory / "steps").rglob("*") if f.is_file()]
    assert sorted(f.suffix for f in files) == [".lib", ".so"]  # one library and its metadata, no temp file left


def test_a_warm_process_imports_no_compiler_and_needs_no_kernel_cache(two_runs, tmp_path):
    directory = tmp_path / "ftrain"
    shutil.copytree(two_runs[0] / "steps", directory / "steps")  # the library alone: no inductor cache
    proc = start_worker(directory, tmp_path / "run.pt")
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
    run = torch.load(tmp_path / "run.pt")
    assert run["compiles"] == 0 and run["imported"] == {"torch._dynamo": False, "torch._inductor": False}
    assert ftrain.tree.equal(run["params"], two_runs[1][0]["params"])


def test_this_process_serves_the_step_from_the_cache_too(two_runs, monkeypatch):
    directory, runs, _ = two_runs
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(directory))
    checked = []
    monkeypatch.setattr(_compiled._Step, "_precheck", lambda self, *args: checked.append(args))
    params, step = cache_worker.train()
    assert step.num_compiles == 0
    assert not checked  # found before its first call: a loaded step was checked before it was saved
    assert ftrain.tree.equal(params, runs[0]["params"])


def test_fit_compiles_only_the_donating_step_and_the_eval_step_when_it_first_evaluates(two_runs, tmp_path, monkeypatch):
    directory = tmp_path / "ftrain"
    shutil.copytree(two_runs[0], directory)  # holds the donating train step only
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(directory))
    state, batches = cache_worker.build()
    train_step = ftrain.make_train_step(cache_worker.loss_fn)
    eval_step = ftrain.make_eval_step(cache_worker.loss_fn, backend="aot_eager")  # (a cheap compile)
    seen = []
    ftrain.fit(
        state, train_step, batches, num_steps=3, eval_step=eval_step, eval_data=batches[:1], eval_every=2,
        progress=False, actions=[lambda run: seen.append(eval_step.num_compiles)],
    )  # fmt: skip
    assert train_step.num_compiles == 0  # the donating form, from the cache; the pure form never compiled
    assert seen == [0, 1, 1]  # compiled by the first evaluation (step 2), not before


# -- Faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".so", ".lib"], ids=["library", "its-metadata"])
def test_a_corrupt_artifact_is_compiled_afresh_with_one_warning_and_replaced(two_runs, tmp_path, monkeypatch, suffix):
    directory = tmp_path / "ftrain"
    shutil.copytree(two_runs[0], directory)  # (with the library by graph in inductor's dir: the rebuild is cheap)
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(directory))
    monkeypatch.setattr(_cache, "_WARNED", set())  # (warned once per key and process: the other case warned)
    [path] = (directory / "steps").rglob(f"*{suffix}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, step = cache_worker.train()
        again, step2 = cache_worker.train()  # the replaced file now serves
    [message] = [str(w.message) for w in caught if "could not be used" in str(w.message)]  # one warning
    assert "checksum" in message and str(path) in message
    assert (step.num_compiles, step2.num_compiles) == (1, 0)
    assert path.read_bytes() != bytes(data)
    assert ftrain.tree.equal(params, two_runs[1][0]["params"]) and ftrain.tree.equal(again, params)


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 3], lambda b: b"", lambda b: b[:-1], lambda b: b"x" + b[1:]],
    ids=["truncated", "empty", "last-byte-missing", "bad-magic"],
)
def test_a_torn_or_foreign_file_is_never_read_as_a_step(tmp_path, damage):
    store = _cache._Store(tmp_path)
    key = "ab" + "0" * 38
    store.write(key, b"payload" * 100)
    assert store.read(key) == b"payload" * 100
    path = store.path(key)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError):
        store.read(key)


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    store = _cache._Store(tmp_path)
    key = "cd" + "1" * 38
    store.write(key, b"old")
    store.write(key, b"new")
    assert store.read(key) == b"new"
    assert [p.name for p in store.path(key).parent.iterdir()] == [store.path(key).name]


def test_the_compile_lock_makes_a_second_process_wait(tmp_path):
    store = _cache._Store(tmp_path)
    order = []

    def second():
        with store.lock("k" * 40):  # (flock is per open file: a second open waits as another process would)
            order.append("second")

    with store.lock("k" * 40):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]


# -- The key: any ingredient changed is a miss ---------------------------------------------------


def test_the_key_is_the_same_for_the_same_step_built_again():
    assert key_of() == key_of()


@pytest.mark.parametrize(
    "changes",
    [{"lr": 2e-2}, {"width": 17}, {"dtype": torch.float64}, {"batch_size": 5}],
    ids=["adamw-learning_rate", "layer-width", "dtype", "batch-shape"],
)
def test_changing_one_ingredient_changes_the_key(changes):
    assert key_of(**changes) != key_of()


def test_a_global_constant_the_loss_reads_is_in_the_key(monkeypatch):
    base = key_of()
    monkeypatch.setattr(cache_worker, "SCALE", 2.0)
    assert key_of() != base


def test_the_loss_functions_code_is_in_the_key(monkeypatch):
    base = key_of()

    def other_loss(apply, params, buffers, batch, key):
        x, y = batch
        logits, buffers = apply(params, buffers, x, key=key)
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1), {}, buffers

    monkeypatch.setattr(cache_worker, "loss_fn", other_loss)
    assert key_of() != base


def test_the_torch_version_cpu_and_determinism_are_in_the_key(monkeypatch):
    base = key_of()
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", torch.__version__ + ".post1")
        assert key_of() != base
    with monkeypatch.context() as m:
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")
        assert key_of() != base
    state, batches = cache_worker.build()
    core = ftrain.make_train_step(cache_worker.loss_fn, compile=False).core
    with torch.no_grad():  # deterministic algorithms off
        assert step_key_of(core, (state, batches[0]), {"backend": "inductor"}) != base
    assert key_of() == base


def test_logger_methods_a_library_adds_are_not_in_the_key_but_a_users_skipped_function_is(monkeypatch):
    # Importing transformers adds Logger.warning_once, which ftrain's compiles then skip in the
    # graph; a process that imported it must still find the steps of one that did not.
    base = Scoped(key_of)()

    def warning_once(self, *args, **kwargs):
        pass

    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    assert Scoped(key_of)() == base
    monkeypatch.setattr(torch._dynamo.config, "ignore_logging_functions", {print})
    assert Scoped(key_of)() != base


def test_an_eager_call_of_the_model_leaves_the_key_as_it_was():
    # (The apply memoizes its tensor slots and whether it draws; a traced call reads neither.)
    state, batches = cache_worker.build()
    before = fingerprint(state)
    state.apply_fn(state.params, state.buffers, batches[0][0], key=ftrain.random.key(1))
    assert fingerprint(state) == before


def test_a_module_attribute_and_an_optimizer_constant_are_in_the_key():
    def state_with(p: float, b1: float):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(p))
        return ftrain.TrainState.create(model, ftrain.optim.adam(1e-3, b1=b1))

    base = fingerprint(state_with(0.1, 0.9))
    assert fingerprint(state_with(0.1, 0.9)) == base
    assert fingerprint(state_with(0.2, 0.9)) != base
    assert fingerprint(state_with(0.1, 0.8)) != base


def test_tensor_values_are_not_in_the_key_but_their_metadata_is():
    assert fingerprint(torch.zeros(3)) == fingerprint(torch.ones(3))
    assert fingerprint(torch.zeros(3)) != fingerprint(torch.zeros(3, dtype=torch.float64))
    assert fingerprint(torch.zeros(4)[::2]) != fingerprint(torch.zeros(2))  # strides


def test_partials_namespaces_and_numpy_values_are_fingerprinted_and_c_objects_refused():
    import collections
    import functools
    import types

    import numpy as np

    def add(a, b):
        return a + b

    assert fingerprint(functools.partial(add, 1)) != fingerprint(functools.partial(add, 2))
    assert fingerprint(types.SimpleNamespace(lr=0.1)) != fingerprint(types.SimpleNamespace(lr=0.2))
    assert fingerprint(np.float32(1)) != fingerprint(np.float32(2))
    assert fingerprint(np.arange(3)) != fingerprint(np.arange(3) + 1)  # traced as a constant
    for opaque in (threading.Lock(), collections.deque([1])):
        with pytest.raises(Unfingerprintable):
            fingerprint(opaque)


LOCK = threading.Lock()


def uses_a_lock(x, lock=LOCK):
    return x + 1


def test_what_cannot_be_fingerprinted_is_compiled_uncached_and_says_why(tmp_path, caplog):
    with pytest.raises(Unfingerprintable):
        fingerprint(LOCK)
    step = CachedCompile(uses_a_lock, backend="aot_eager", directory=tmp_path)
    with caplog.at_level(logging.DEBUG, logger=_cache.__name__):
        assert torch.equal(step(torch.zeros(2)), torch.ones(2))
    assert "without the cache" in caplog.text and "lock" in caplog.text
    assert step.count == 1 and not (tmp_path / "steps").exists()


# -- Where it lives -----------------------------------------------------------------------------


def test_the_cache_lives_under_the_users_cache_home_not_a_temp_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FTRAIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "ftrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "ftrain"
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_libraries_persist_by_graph_beside_the_steps_so_a_new_key_with_the_same_graph_only_traces(two_runs):
    directory, _, _ = two_runs
    [library] = (directory / "inductor" / "libraries").glob("*.so")
    [step] = (directory / "steps").rglob("*.so")
    assert library.read_bytes() == step.read_bytes()


x86_linux = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64", reason="the quick ISA probe is for x86 Linux"
)


@x86_linux
def test_the_quick_isa_probe_answers_as_inductors_own_build_and_load_does():
    from torch._inductor import cpu_vec_isa

    host = cpu_vec_isa.x86_isa_checker()
    for isa in (cpu_vec_isa.VecAVX2(), cpu_vec_isa.VecAVX512()):
        if str(isa) in host:  # (a machine without the ISA never asks)
            assert _cache._quick_isa_probe(isa) is cpu_vec_isa.VecISA.check_build(isa, cpu_vec_isa.VecISA._avx_code)

    class NoSuchFlags(cpu_vec_isa.VecAVX2):
        _arch_flags = "-mno-such-isa-flag"

    assert _cache._quick_isa_probe(NoSuchFlags()) is False
    assert _cache._quick_isa_probe(cpu_vec_isa.VecNEON()) is None  # (not x86: inductor probes it)


@x86_linux
def test_a_first_run_answers_inductors_isa_probe_without_its_build_and_records_the_answer(tmp_path, monkeypatch):
    from torch._inductor.cpu_vec_isa import VecAVX2, VecISA

    built = []
    monkeypatch.setattr(VecISA, "check_build", lambda isa, code: built.append(code) or True)
    store = _cache._Store(tmp_path)
    with store.inductor_dir():
        assert VecISA.check_build(VecAVX2(), VecISA._avx_code) is True
        assert VecISA.check_build(VecAVX2(), "int other_probe;") is True
    assert built == ["int other_probe;"]  # the ATen build answered quickly, the others as inductor does
    (record,) = (tmp_path / "isa").glob("*.json")
    assert sum(VecAVX2().build_arch_flags() in key for key in record.read_text().splitlines()) == 2
    with store.inductor_dir():  # a later process: from the record
        assert VecISA.check_build(VecAVX2(), "int other_probe;") is True
    assert built == ["int other_probe;"]


# -- Shapes that change ---------------------------------------------------------------------------


def affine(x, w):
    return (x @ w).relu().sum(0)


def test_a_new_batch_size_compiles_once_more_with_a_dynamic_dim_that_serves_every_later_size(tmp_path):
    w = torch.randn(3, 2)
    step = CachedCompile(affine, backend="aot_eager", directory=tmp_path)
    batches = [torch.randn(n, 3) for n in (4, 5, 6, 7)]
    for x in batches:
        assert torch.allclose(step(x, w), affine(x, w))
    assert (step.count, step.hits) == (2, 0)
    assert not hasattr(batches[1], "_dynamo_dynamic_indices")  # marked for its compile only
    again = CachedCompile(affine, backend="aot_eager", directory=tmp_path)
    assert again.prepare(torch.ones(4, 3), w)  # loaded: the call will not compile
    for n in (4, 5, 9):
        again(torch.ones(n, 3), w)
    assert (again.count, again.hits) == (0, 2)


def test_prepare_says_whether_a_call_would_compile(tmp_path):
    step = CachedCompile(affine, backend="aot_eager", directory=tmp_path)
    assert not step.prepare(torch.ones(2, 3), torch.ones(3, 2))
    assert step.count == 0


# -- The library tier ---------------------------------------------------------------------------


WEIGHT = torch.randn(3)


def scaled(x):
    return x * WEIGHT  # (its values would be compiled into a library: dynamo reads them at run time)


def shifted(x):
    return x + torch.tensor([1.0, 2.0, 3.0])  # (a constant made in the step: it would be compiled in)


@pytest.mark.parametrize(("fn", "why"), [(scaled, "could not trace"), (shifted, "captures tensors")])
def test_a_step_that_captures_a_tensor_is_not_built_into_a_library_and_the_cache_remembers_why(
    tmp_path, caplog, monkeypatch, fn, why
):
    x = torch.randn(2, 3)
    step = CachedCompile(fn, directory=tmp_path)
    with caplog.at_level(logging.DEBUG, logger=_cache.__name__):
        assert torch.equal(step(x), fn(x))
    assert f"{fn.__name__} is not built into a library" in caplog.text and why in caplog.text
    monkeypatch.setattr(_cache._aoti, "build", lambda *args, **kwargs: pytest.fail("traced again"))
    again = CachedCompile(fn, directory=tmp_path)
    assert again.prepare(x)  # the saved dynamo function, found at once
    WEIGHT.mul_(2)
    assert torch.equal(again(x), fn(x)) and again.count == 0


def halved(x):
    # Numbers from the code (transformers makes such tensors): as constants in the library, as good.
    return x * torch.tensor(0.5) + torch.tensor([]).sum() + torch.tensor([2.0, 2.0]).mean()


def test_tensors_the_step_fills_with_one_number_are_built_into_the_library(tmp_path):
    step = CachedCompile(halved, directory=tmp_path)
    x = torch.randn(4)
    assert torch.equal(step(x), halved(x))
    assert step.count == 1 and isinstance(step._entries[0], _cache._aoti.Library)


def test_a_library_serves_only_inputs_laid_out_as_it_was_built_for_then_a_dynamic_graph_serves_all_sizes(tmp_path):
    w = torch.randn(3, 2)
    step = CachedCompile(affine, directory=tmp_path)
    x = torch.randn(4, 3)
    assert torch.allclose(step(x, w), affine(x, w))
    strided = torch.randn(3, 4).t()  # same shape, other strides: the kernels would read it wrongly
    assert torch.allclose(step(strided, w), affine(strided, w))
    assert torch.allclose(step(x.double(), w.double()), affine(x.double(), w.double()))
    assert (step.count, len(step._entries)) == (3, 3)
    assert all(isinstance(entry, _cache._aoti.Library) for entry in step._entries)
    for n in (5, 6, 9):  # a fourth kind of input, a new batch size: one graph dynamic in it serves them all
        bigger = torch.randn(n, 3)
        assert torch.allclose(step(bigger, w), affine(bigger, w))
    assert step.count == 4 and isinstance(step._entries[-1], _cache._Entry)


def test_an_eval_steps_library_takes_any_batch_size_of_two_or_more_in_this_process_and_the_next(tmp_path, monkeypatch):
    # An evaluation's splits and its last, partial batch are new batch sizes: one build serves them.
    monkeypatch.setenv("FTRAIN_CACHE_DIR", str(tmp_path))
    state, _ = cache_worker.build()
    eager = ftrain.make_eval_step(cache_worker.loss_fn, compile=False)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (269, 270, 2, 1)]
    for new in (True, False):
        eval_step = ftrain.make_eval_step(cache_worker.loss_fn)
        results = [eval_step(state, batch) for batch in batches[:3]]
        assert (eval_step.num_compiles, eval_step.num_loads) == ((1, 0) if new else (0, 1))
        for batch, metrics in zip(batches, results):
            torch.testing.assert_close(metrics, eager(state, batch))
        # One row has no batch size to vary (a size-1 dim broadcasts): a library of its own.
        torch.testing.assert_close(eval_step(state, batches[3]), eager(state, batches[3]))
        assert (eval_step.num_compiles, eval_step.num_loads) == ((2, 0) if new else (0, 2))
    assert len(list((tmp_path / "steps").rglob("*.so"))) == 2


def by_parity(w, batch):
    return batch @ w if batch.shape[0] % 2 == 0 else -(batch @ w)  # (the batch size decides the graph)


def test_a_step_whose_graph_depends_on_the_batch_size_gets_a_library_per_size_and_the_cache_remembers_why(
    tmp_path, caplog
):
    w = torch.randn(3, 2)
    step = CachedCompile(by_parity, directory=tmp_path, any_batch_size=True)
    with caplog.at_level(logging.DEBUG, logger=_cache.__name__):
        for n in (4, 5):
            x = torch.randn(n, 3)
            assert torch.equal(step(w, x), by_parity(w, x))
    assert "not built into a library for any batch size: its trace depends on the batch size" in caplog.text
    assert step.count == 2 and all(not entry.dynamic for entry in step._entries)
    again = CachedCompile(by_parity, directory=tmp_path, any_batch_size=True)
    assert again.prepare(w, torch.ones(4, 3)) and again._no_any_size is not None  # (remembered: not traced again)
