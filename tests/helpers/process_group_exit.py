"""Run under torchrun (2 processes): the backend joins the group, sums over it, closes as `train` does
after a run, and rank 1 exits at once while rank 0 still works; argv[1] 'open' leaves the group to the exit."""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reasoning_torch.backend import TorchBackend  # noqa: E402

backend = TorchBackend(device="cpu")
for _ in range(50):
    backend.all_sum(np.ones(1000))
if sys.argv[1] != "open":
    backend.close()
if backend.rank == 0:
    time.sleep(0.5)  # rank 0 writes the outputs while rank 1 is gone
