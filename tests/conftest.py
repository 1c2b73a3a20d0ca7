"""Shared fixtures. Compiled functions are costly on a 2-core box: share them here."""

import torch

# Fixed threads: determinism and comparable timings across machines.
torch.set_num_threads(2)
