"""AdamW whose moments travel with the checkpoint (reasoning_torch/optimizer.py says why), in the
same file layout: `{parameter}.exp_avg`, `{parameter}.exp_avg_sq` and `step`."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from shared.checkpoints.layouts import OPTIMIZER_FILE
from shared.training.config import ADAM_BETAS

MOMENT_NAMES = {"m": "exp_avg", "v": "exp_avg_sq"}


def make_optimizer(model, lr: float, weight_decay: float, saved: dict[str, mx.array]) -> optim.AdamW:
    # bias_correction: MLX leaves it off by default; PyTorch always corrects, and parity needs it
    optimizer = optim.AdamW(learning_rate=lr, betas=list(ADAM_BETAS), weight_decay=weight_decay,
                            bias_correction=True)
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    if saved and all(f"{name}.exp_avg" in saved for name in names):
        moments = [(f"{name}.{ours}", saved[f"{name}.{theirs}"]) for name in names
                   for ours, theirs in MOMENT_NAMES.items()]
        state = tree_unflatten(moments)
        state["step"] = mx.array(int(saved["step"].item()), dtype=mx.uint64)
        state["learning_rate"] = mx.array(lr)
        optimizer.state = state
    return optimizer


def save_optimizer_state(optimizer: optim.AdamW, folder: Path) -> None:
    tensors = {}
    for key, value in tree_flatten(optimizer.state):
        name, _, moment = key.rpartition(".")
        if moment in MOMENT_NAMES:
            tensors[f"{name}.{MOMENT_NAMES[moment]}"] = value.astype(mx.float32)
    if tensors:
        tensors["step"] = optimizer.step.astype(mx.float32)
        write_optimizer_file(tensors, folder)


def write_optimizer_file(tensors: dict[str, mx.array], folder: Path) -> None:
    # in name order: mlx writes in the dict's order, and moments passed on as loaded must give the same bytes
    mx.save_safetensors(str(Path(folder) / OPTIMIZER_FILE), dict(sorted(tensors.items())))


def load_optimizer_state(folder: Path) -> dict[str, mx.array]:
    path = Path(folder) / OPTIMIZER_FILE
    return mx.load(str(path)) if path.exists() else {}
