"""The process's plumbing: user errors, progress bars, run tracking (W&B), data-parallel ranks, peak memory."""
