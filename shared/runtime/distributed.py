"""Data-parallel runs: which rows a process takes, and results gathered across processes.

The processes come from the engines people already run (torchrun / accelerate launch for PyTorch,
mlx.launch for MLX);
each backend wraps its framework's collectives as `all_sum`, and everything here is built on that.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

AllSum = Callable[[np.ndarray], np.ndarray]


def launched_processes() -> int:
    """How many processes the launcher started: torchrun and accelerate set WORLD_SIZE, mlx.launch
    writes a hostfile with one entry per process; 1 without a launcher."""
    try:
        if os.environ.get("MLX_HOSTFILE"):
            return max(1, len(json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())))
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except (OSError, ValueError, TypeError):
        return 1


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (torchrun: RANK, mlx.launch: MLX_RANK); 0 without one."""
    try:
        return int(os.environ.get("RANK") or os.environ.get("MLX_RANK") or 0)
    except ValueError:
        return 0


LAUNCHERS = {"torch": "torchrun (or accelerate launch)", "mlx": "mlx.launch"}


def launcher_backend() -> str:
    """The backend whose launcher started this process: mlx.launch writes MLX_HOSTFILE, torchrun WORLD_SIZE."""
    return "mlx" if os.environ.get("MLX_HOSTFILE") else "torch"


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This process's share of a global batch: every world_size-th item from its rank on."""
    return list(items[rank::world_size])


def gather_shards(local: list, rank: int, world_size: int, all_sum: AllSum) -> list:
    """The inverse of `shard` on every process: each process's items (JSON values) back in global order."""
    if world_size == 1:
        return list(local)
    encoded = np.frombuffer(json.dumps(local).encode(), dtype=np.uint8)
    lengths = all_sum(np.eye(world_size)[rank] * len(encoded)).astype(np.int64)
    buffer = np.zeros(int(lengths.sum()))
    start = int(lengths[:rank].sum())
    buffer[start:start + len(encoded)] = encoded
    data = all_sum(buffer).astype(np.uint8).tobytes()
    parts, offset = [], 0
    for length in lengths:
        parts.append(json.loads(data[offset:offset + length]))
        offset += length
    merged = [None] * sum(len(part) for part in parts)
    for index, part in enumerate(parts):
        merged[index::world_size] = part
    return merged
