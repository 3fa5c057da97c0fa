"""Right-padding for the MLX backend: mlx-lm models take no attention mask, so each packed row is rolled
to start at column 0."""
from __future__ import annotations

import numpy as np

from shared.algorithms.padding import TokenBatch


def leading_padding(attention_mask: np.ndarray) -> np.ndarray:
    """(B,) count of pad tokens before each row's first real token."""
    return (np.cumsum(attention_mask, axis=1) == 0).sum(axis=1)


def roll_rows(array: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Row b rolled left by shifts[b] (right when negative).

    Rolling a packed batch left by its leading padding right-pads every row: a model without an
    attention mask (mlx-lm's) then reads each row from position 0 with plain causal attention,
    which is the same computation as left padding with a mask. Rolling back restores the layout.
    """
    columns = np.arange(array.shape[1])
    index = (columns[None, :] + np.asarray(shifts)[:, None]) % array.shape[1]
    return np.take_along_axis(array, index, axis=1)


def right_padded(batch: TokenBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shifts, ids, completion mask) with every row rolled to start at column 0 (see roll_rows)."""
    shifts = leading_padding(batch.attention_mask)
    return shifts, roll_rows(batch.input_ids, shifts), roll_rows(batch.completion_mask, shifts).astype(np.float32)
