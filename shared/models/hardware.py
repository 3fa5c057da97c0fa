"""Which backend to use, decided without importing either framework."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from shared.checkpoints.layouts import BACKEND_OF_LAYOUT, check_checkpoint, detect_layout
from shared.runtime.distributed import launched_processes, launcher_backend
from shared.runtime.errors import UserError

INSTALL_HINTS = {
    "torch": "pip install -e '.[torch]'  (Linux CPU: pip install torch==2.13.0 transformers peft)",
    "mlx": "pip install -e '.[mlx]'  (Linux: pip install 'mlx[cpu]' mlx-lm)",
}
REQUIRED_MODULES = {"torch": ("torch", "transformers", "peft"), "mlx": ("mlx", "mlx_lm")}


def is_installed(backend: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in REQUIRED_MODULES[backend])


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def choose_backend(requested: str) -> str:
    """auto: under a launcher (mlx.launch, torchrun) its framework; else MLX on Apple Silicon, else
    PyTorch (CUDA; and on a CPU, where bench/ measures it faster)."""
    if requested == "auto" and launched_processes() > 1:
        requested = launcher_backend()
    if requested == "auto":
        candidates = ["mlx", "torch"] if is_apple_silicon() else ["torch", "mlx"]
        for name in candidates:
            if is_installed(name):
                return name
        raise UserError(f"no backend is installed; install one: {INSTALL_HINTS[candidates[0]]}")
    if not is_installed(requested):
        raise UserError(f"the {requested} backend needs packages that are missing: {INSTALL_HINTS[requested]}")
    return requested


def backend_for_checkpoint(requested: str, layout: str) -> str:
    """auto on an adapter or a quantized model: the backend whose library wrote it; full folders load in either."""
    return choose_backend(BACKEND_OF_LAYOUT.get(layout, "auto") if requested == "auto" else requested)


def resolve_backend(requested: str, checkpoint: Path | None = None) -> str:
    """The backend a command runs on: `requested`, or for auto the hardware's choice (for a LoRA or
    quantized `checkpoint`, the library that wrote it); a missing checkpoint is a one-line error."""
    layout = detect_layout(check_checkpoint(checkpoint)) if checkpoint else "full"
    return backend_for_checkpoint(requested, layout)
