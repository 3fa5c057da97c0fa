"""Micro-batches for the PyTorch backend: rows of similar length together, each cut to the columns it uses."""
from __future__ import annotations

import numpy as np


def micro_batches(attention_mask: np.ndarray, size: int) -> list[tuple[np.ndarray, slice]]:
    """(rows, columns) of at most `size` rows each, rows sorted by where they end so that a group
    pads little, and only the columns its rows use: a 50-token completion is not run at 200."""
    used = attention_mask.astype(bool)
    starts = used.argmax(1)
    ends = used.shape[1] - used[:, ::-1].argmax(1)
    order = np.argsort(ends, kind="stable")
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return [(rows, slice(int(starts[rows].min()), int(ends[rows].max()))) for rows in groups]
