"""The backend interface: the short list of things that truly differ between PyTorch and MLX.

Everything else (data, batching, rewards, advantages, schedules, logging, evaluation) lives once in
`shared/` and talks to a backend through numpy arrays and token-id lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.algorithms.padding import TokenBatch
from shared.training.config import GRPOConfig, ModelConfig, SFTConfig


@dataclass
class GRPOBatch:
    tokens: TokenBatch | None  # None: no rows on this process (it still joins the gradient sum)
    advantages: np.ndarray  # (B,)
    old_logprobs: np.ndarray | None  # (B, T); None: the batch was just sampled by this policy
    ref_logprobs: np.ndarray | None  # (B, T); needed when beta > 0
    # the loss's normalisers come from every sampled sequence, also when only some rows are trained
    sampled_sequences: int | None = None
    sampled_completion_tokens: int | None = None

    def loss_totals(self, max_completion_tokens: int) -> dict[str, int]:
        return {"total_sequences": self.sampled_sequences or len(self.tokens),
                "total_tokens": self.sampled_completion_tokens or int(self.tokens.completion_mask.sum()),
                "max_completion_tokens": max_completion_tokens}


class Backend(Protocol):
    name: str
    tokenizer: Any  # a Hugging Face tokenizer (mlx-lm wraps the same one)
    rank: int  # this process's place in a data-parallel run (0 writes the outputs)
    world_size: int  # processes in the run (1 without a launcher)
    generation_stats: dict  # the last generate call's counts: forwards, rows run, drafted and accepted tokens

    def load(self, model_path: Path, model: ModelConfig, trainable: bool = True) -> None:
        """Load a model folder (full weights, or a LoRA adapter folder that names its base).

        The optimizer starts with the moments saved in the folder, if any; one optimizer serves
        both phases of a run, so GRPO starts with SFT's moments.
        """

    def seed(self, seed: int) -> None:
        """Seed the framework's global RNG (LoRA initialisation, dropout): the driver reseeds every step."""

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """`values` summed element-wise over the processes of the run, as float64 (a copy when alone)."""

    def close(self) -> None:
        """After a run that succeeded on every process: leave the launcher's process group (no-op alone)."""

    def set_reference(self, folder: Path | None = None) -> None:
        """The KL term's reference policy: the current weights, or those saved in `folder` (a resumed
        run's GRPO start). With LoRA the reference is always the base with the adapters off."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int | None = None) -> list[list[int]]:
        """One completion per prompt, batched with a KV cache, each ending at its stop token (seeded
        sampling when `seed` is given; temperature 0 is greedy)."""

    def completion_logprobs(self, batch: TokenBatch, temperature: float = 1.0,
                            reference: bool = False) -> np.ndarray:
        """(B, T) log-prob of each token given its prefix (0 outside completion tokens)."""

    def sft_step(self, batch: TokenBatch, lr: float, settings: SFTConfig, total_tokens: int | None = None) -> dict:
        """One optimiser step on the cross-entropy of completion tokens over `total_tokens` (the whole
        step's, over every process; default: this batch's); returns loss and grad norm."""

    def grpo_step(self, batch: GRPOBatch, lr: float, settings: GRPOConfig) -> dict:
        """One optimiser step on the GRPO loss; returns loss, kl, clip fraction and grad norm. Gradients
        are summed over the processes of the run; `batch.tokens` None: this process has no rows."""

    def weights_are_finite(self) -> bool:
        """No NaN or inf in the trained weights (checked after every optimiser step)."""

    def sequences_per_pass(self, columns: int, vocab_size: int) -> int:
        """How many sequences of `columns` tokens one forward pass of a training step takes."""

    def available_memory(self) -> int | None:
        """Bytes free for this run: the GPU's on CUDA, else the system's (unified memory on a Mac)."""

    def peak_memory(self) -> int:
        """Bytes at most in use since reset_peak_memory: the GPU's allocations on CUDA and MLX, else the process's
        resident memory."""

    def reset_peak_memory(self) -> None:
        """Count the peak from now (a phase's, an evaluation's)."""

    def save(self, folder: Path) -> None:
        """Write a checkpoint the backend's own ecosystem loads with no code of ours (plus optimizer moments)."""
