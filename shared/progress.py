"""Progress bars (tqdm on a terminal, silent otherwise) and the log format."""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


def progress_bar(total: int, label: str, unit: str = "step", initial: int = 0):
    return tqdm(total=total, desc=label, unit=unit, initial=initial, dynamic_ncols=True, leave=False,
                disable=not sys.stderr.isatty())


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
