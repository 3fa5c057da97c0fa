"""mx.distributed under mlx.launch (the ring backend over TCP; --hosts for several Macs)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from shared.runtime.distributed import launched_processes


def join_group() -> tuple[int, int]:
    """(rank, world size) of the group mlx.launch started this process in; (0, 1) without it."""
    if launched_processes() == 1:  # no launcher, or mlx.launch -n 1 (an empty hostfile)
        return 0, 1
    group = mx.distributed.init(strict=True)
    return group.rank(), group.size()


def all_sum(values: np.ndarray) -> np.ndarray:
    summed = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float64)), stream=mx.cpu)
    return np.array(summed, dtype=np.float64)


def sum_gradients(gradients: dict) -> dict:
    """Every process's gradients summed (as mlx-lm's trainer averages them, without the division)."""
    summed = tree_map(lambda gradient: mx.distributed.all_sum(gradient), gradients)
    mx.eval(summed)
    return summed
