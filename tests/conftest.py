from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torch before reasoning_mlx: the OpenBLAS that reasoning_mlx loads globally for mlx would otherwise
# also replace torch's own (5x faster) matmul kernels in this process.
import torch  # noqa: E402,F401
import reasoning_mlx  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from shared.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
