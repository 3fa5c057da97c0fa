"""Constructing a backend: the one module that imports either framework's package (the CLI and bench/ use it)."""
from __future__ import annotations

from pathlib import Path

from shared.checkpoints.conversion import native_layout
from shared.models.hardware import resolve_backend
from shared.runtime.distributed import LAUNCHERS, launched_processes, launcher_backend
from shared.runtime.errors import UsageError
from shared.training.config import ModelConfig


def make_backend(requested: str, micro_batch_size: int | None = None, checkpoint: Path | None = None):
    """The backend asked for; with auto and a LoRA or quantized checkpoint, the one whose library wrote it."""
    name = resolve_backend(requested, checkpoint)
    if launched_processes() > 1 and name != launcher_backend():
        raise UsageError(f"this process was started by {LAUNCHERS[launcher_backend()]}, which runs the "
                         f"{launcher_backend()} backend: use --backend {launcher_backend()}")
    options = {"micro_batch_size": micro_batch_size} if micro_batch_size else {}
    if name == "torch":
        from reasoning_torch.backend import TorchBackend
        return TorchBackend(**options)
    from reasoning_mlx.backend import MLXBackend
    return MLXBackend(**options)


def load_for_inference(checkpoint: Path, backend_name: str):
    """Either backend runs either library's checkpoint: the other's layout is converted in a temporary folder."""
    backend = make_backend(backend_name, checkpoint=checkpoint)
    with native_layout(checkpoint, backend.name) as folder:
        backend.load(folder, ModelConfig(name=str(checkpoint)), trainable=False)
    return backend
