"""Which backend to use, decided without importing either framework."""
from __future__ import annotations

import importlib.util
import platform

from shared.errors import UserError

INSTALL_HINTS = {
    "torch": "pip install -e '.[torch]'  (Linux CPU: pip install torch==2.13.0 transformers peft)",
    "mlx": "pip install -e '.[mlx]'  (Linux: pip install 'mlx[cpu]' mlx-lm)",
}
REQUIRED_MODULES = {"torch": ("torch", "transformers", "peft"), "mlx": ("mlx", "mlx_lm")}
BUILT_BACKENDS = ("torch",)


def is_installed(backend: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in REQUIRED_MODULES[backend])


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def choose_backend(requested: str) -> str:
    """auto: MLX on Apple Silicon, PyTorch on NVIDIA, otherwise PyTorch (the faster one on CPU)."""
    if requested == "auto":
        candidates = ["mlx", "torch"] if is_apple_silicon() else ["torch", "mlx"]
        candidates = [name for name in candidates if name in BUILT_BACKENDS]
        for name in candidates:
            if is_installed(name):
                return name
        raise UserError(f"no backend is installed; install one: {INSTALL_HINTS['torch']}")
    if requested not in BUILT_BACKENDS:
        raise UserError(f"the {requested} backend is not built yet; use --backend torch")
    if not is_installed(requested):
        raise UserError(f"the {requested} backend needs packages that are missing: {INSTALL_HINTS[requested]}")
    return requested
