"""Shared fixtures. Compiled functions are costly on a 2-core box: share them here."""

import torch

# Fixed threads: determinism and comparable timings across machines.
torch.set_num_threads(2)

# Compiled steps shared by the step, loop and checkpoint tests (see tests/step_fixtures.py).
from step_fixtures import mlp_setup as mlp_setup  # noqa: E402

# Scripts the tests start as subprocesses: not modules to import for doctests.
collect_ignore = ["dist_worker.py", "interrupt_script.py", "mesh_worker.py", "resume_script.py"]
