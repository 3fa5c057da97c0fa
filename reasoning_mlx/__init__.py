"""The MLX backend (mlx + mlx-lm): Apple Silicon first; also runs on Linux CPU with `mlx[cpu]`.

On Linux the `mlx[cpu]` wheel bundles the reference BLAS, about 30x slower at matmuls than
OpenBLAS. Loading the system's OpenBLAS globally before mlx is imported makes mlx bind to it
(the same effect as LD_PRELOAD), so importing this package first is all it takes.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import platform
import sys

OPENBLAS_PATTERNS = ("/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
                     "/usr/lib/*-linux-gnu/libopenblas.so.0", "/usr/lib64/libopenblas.so.0")
SLOW_BLAS_HINT = "for 30x faster matmuls install OpenBLAS: sudo apt-get install libopenblas0-pthread"


def find_openblas() -> str | None:
    for pattern in OPENBLAS_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def use_fast_blas() -> bool:
    """On Linux, bind mlx to OpenBLAS if it is installed; warn once if mlx would use the slow BLAS."""
    if platform.system() != "Linux" or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return True
    library = find_openblas()
    if library and "mlx.core" not in sys.modules:
        ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
        return True
    hint = f"import reasoning_mlx before mlx, or set LD_PRELOAD={library}" if library else SLOW_BLAS_HINT
    logging.getLogger("local_reasoning").warning("mlx may be using its slow reference BLAS: %s", hint)
    return False


FAST_BLAS = use_fast_blas()
