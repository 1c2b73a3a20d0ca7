"""Shared fixtures. Compiled functions are costly on a 2-core box: share them here."""

import torch

# Fixed threads: determinism and comparable timings across machines.
torch.set_num_threads(2)

# Compiled steps shared by the step, loop and checkpoint tests (see tests/step_fixtures.py).
from step_fixtures import mlp_setup as mlp_setup  # noqa: E402

# Scripts the tests start as subprocesses: not modules to import for doctests.
collect_ignore = ["dist_worker.py", "interrupt_script.py", "mesh_worker.py", "resume_script.py"]


def pytest_collection_modifyitems(items):
    # The compiled-step cache tests compare this process's cache key with a fresh process's. The key
    # covers global torch/dynamo/inductor settings, which other tests change in this process (then a
    # correct miss fails those tests), so they run first. (A stable sort: the rest keep their order.)
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_cache.py"))
