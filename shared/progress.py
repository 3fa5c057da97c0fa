"""Progress bars: tqdm on a terminal, silent otherwise."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, label: str, unit: str = "step", initial: int = 0):
    return tqdm(total=total, desc=label, unit=unit, initial=initial, dynamic_ncols=True, leave=False,
                disable=not sys.stderr.isatty())
