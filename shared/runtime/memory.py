"""This process's peak memory (resident set size), from the point it was last reset: what a phase needed."""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from shared.runtime.errors import UsageError

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_rss() -> None:
    """Linux counts the peak again from now (5: reset the high-water mark); elsewhere it counts from the start."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The most resident memory since the last reset (Linux) or since the process started."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS says bytes, Linux KiB


FRAMEWORK_BYTES = 2**29  # the framework itself, its kernels and allocator slack: ~0.5 GB measured on CPU
FLOAT = 4  # trained weights, gradients, Adam's moments and activations are fp32


def available_bytes() -> int | None:
    """Memory the system can give this process now (Linux's MemAvailable), else its physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parameter_count(dims: dict) -> int:
    hidden, layers = dims["hidden_size"], dims["num_hidden_layers"]
    head_dim = dims.get("head_dim") or hidden // dims["num_attention_heads"]
    key_value = dims.get("num_key_value_heads", dims["num_attention_heads"]) * head_dim
    attention = 2 * hidden * dims["num_attention_heads"] * head_dim + 2 * hidden * key_value
    embeddings = dims["vocab_size"] * hidden * (1 if dims.get("tie_word_embeddings") else 2)
    return embeddings + layers * (attention + 3 * hidden * dims["intermediate_size"])


def training_step_bytes(dims: dict, full: bool, rows: int, tokens: int, recompute: bool) -> int:
    """An estimate of a training step's peak: the framework, the weights, gradients and Adam's two moments of
    what trains (LoRA's share is small), and what the backward pass keeps of a forward pass of `rows` sequences
    of `tokens`, per layer (measured on SmolLM2: ~16 hidden and 4 MLP-width values a token, and the attention
    row), or with gradient checkpointing each layer's input and one layer's worth. Log-probs come in chunks."""
    parameters = parameter_count(dims)
    hidden, layers = dims["hidden_size"], dims["num_hidden_layers"]
    per_layer = FLOAT * rows * tokens * (16 * hidden + 4 * dims["intermediate_size"] + dims["num_attention_heads"] *
                                         tokens)
    kept = FLOAT * rows * tokens * hidden * layers + per_layer if recompute else per_layer * layers
    return FRAMEWORK_BYTES + FLOAT * parameters * (4 if full else 1) + kept


def check_training_fits(dims: dict, full: bool, recompute: bool, steps: dict[str, tuple[int, int]],
                        available: int | None) -> None:
    """A UsageError when a phase's step (name -> (sequences per forward pass, the longest sequence)) is estimated
    past the memory available, naming the flags that would fit."""
    for phase, (rows, tokens) in steps.items():
        need = training_step_bytes(dims, full, rows, tokens, recompute)
        if available is None or not tokens or need <= available:
            continue
        raise UsageError(f"a {phase} step needs about {need / 2**30:.1f} GB ({rows} sequences of up to {tokens:,} "
                         f"tokens a pass), more than the {available / 2**30:.1f} GB free here: "
                         f"{fitting_flags(dims, full, recompute, rows, tokens, available)}")


def fitting_flags(dims: dict, full: bool, recompute: bool, rows: int, tokens: int, available: int) -> str:
    """The first of: --gradient-checkpointing, fewer sequences a pass, shorter sequences, that fits."""
    def fits(rows: int, tokens: int) -> bool:
        return training_step_bytes(dims, full, rows, tokens, True) <= available

    checkpointing = "" if recompute else "--gradient-checkpointing"
    if not recompute and fits(rows, tokens):
        return f"{checkpointing} would fit"
    fewer = next((r for r in range(rows - 1, 0, -1) if fits(r, tokens)), None)
    if fewer:
        return f"{checkpointing} --micro-batch-size {fewer} would fit".lstrip()
    shorter = next((t for t in range(tokens - tokens // 8, 0, -max(1, tokens // 8)) if fits(1, t)), None)
    if shorter:
        return f"{checkpointing} --micro-batch-size 1 --max-seq-len {shorter} --truncate would fit".lstrip()
    return "not even one short sequence fits: a smaller model"
