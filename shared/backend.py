"""The backend interface: the short list of things that truly differ between PyTorch and MLX.

Everything else (data, batching, rewards, advantages, schedules, logging, evaluation) lives once in
`shared/` and talks to a backend through numpy arrays and token-id lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shared.config import GRPOConfig, ModelConfig


@dataclass
class TokenBatch:
    """Prompts left-padded, completions right-padded, in one (B, T) block.

    Positions follow the mask (cumsum - 1), exactly as during generation with left padding.
    `completion_mask[b, t]` is 1 where token t is a completion token: a target of the loss.
    """
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    completion_mask: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def part(self, rows: np.ndarray, columns: slice) -> "TokenBatch":
        return TokenBatch(*(array[rows][:, columns] for array in
                            (self.input_ids, self.attention_mask, self.position_ids, self.completion_mask)))


def micro_batches(attention_mask: np.ndarray, size: int) -> list[tuple[np.ndarray, slice]]:
    """(rows, columns) of at most `size` rows each, rows sorted by where they end so that a group
    pads little, and only the columns its rows use: a 50-token completion is not run at 200."""
    used = attention_mask.astype(bool)
    starts = used.argmax(1)
    ends = used.shape[1] - used[:, ::-1].argmax(1)
    order = np.argsort(ends, kind="stable")
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    return [(rows, slice(int(starts[rows].min()), int(ends[rows].max()))) for rows in groups]


def pack_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(len(c) for c in completions)
    size = (len(prompts), prompt_width + completion_width)
    input_ids = np.full(size, pad_id, dtype=np.int64)
    attention_mask = np.zeros(size, dtype=np.int64)
    completion_mask = np.zeros(size, dtype=np.int64)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        start, end = prompt_width - len(prompt), prompt_width + len(completion)
        input_ids[row, start:end] = prompt + completion
        attention_mask[row, start:end] = 1
        completion_mask[row, prompt_width:end] = 1
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    return TokenBatch(input_ids, attention_mask, position_ids, completion_mask)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) for generation: prompts right-aligned so every row's next token is at the end."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """(each prompt once, in order of first appearance; for each row, the index of its prompt there):
    a GRPO group repeats its prompt G times, and its prefill need run once."""
    first: dict[tuple[int, ...], int] = {}
    index = np.array([first.setdefault(tuple(p), len(first)) for p in prompts])
    return [list(p) for p in first], index


def leading_padding(attention_mask: np.ndarray) -> np.ndarray:
    """(B,) count of pad tokens before each row's first real token."""
    return (np.cumsum(attention_mask, axis=1) == 0).sum(axis=1)


def roll_rows(array: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Row b rolled left by shifts[b] (right when negative).

    Rolling a packed batch left by its leading padding right-pads every row: a model without an
    attention mask (mlx-lm's) then reads each row from position 0 with plain causal attention,
    which is the same computation as left padding with a mask. Rolling back restores the layout.
    """
    columns = np.arange(array.shape[1])
    index = (columns[None, :] + np.asarray(shifts)[:, None]) % array.shape[1]
    return np.take_along_axis(array, index, axis=1)


def trim_completion(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a sampled row after its first stop token (kept: the policy must learn to stop)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


@dataclass
class GRPOBatch:
    tokens: TokenBatch
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


def rows_with_signal(advantages: np.ndarray, beta: float) -> np.ndarray:
    """The rows whose loss has a gradient. Without a KL term a zero advantage makes every token's
    loss -min(r * 0, clip(r) * 0) = 0, so a group whose samples all scored the same teaches nothing."""
    advantages = np.asarray(advantages)
    return np.arange(len(advantages)) if beta else np.flatnonzero(advantages)


class Backend(Protocol):
    name: str
    tokenizer: Any  # a Hugging Face tokenizer (mlx-lm wraps the same one)

    def load(self, model_path: Path, model: ModelConfig, trainable: bool) -> None:
        """Load a model folder (full weights, or a LoRA adapter folder that names its base).

        The optimizer starts with the moments saved in the folder, if any; one optimizer serves
        both phases of a run, so GRPO starts with SFT's moments.
        """

    def seed(self, seed: int) -> None:
        """Seed the framework's global RNG (LoRA initialisation, dropout): the driver reseeds every step."""

    def set_reference(self, folder: Path | None = None) -> None:
        """The KL term's reference policy: the current weights, or those saved in `folder` (a resumed
        run's GRPO start). With LoRA the reference is always the base with the adapters off."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int) -> list[list[int]]:
        """One completion per prompt, batched with a KV cache, each ending at its stop token."""

    def completion_logprobs(self, batch: TokenBatch, temperature: float, reference: bool = False) -> np.ndarray:
        """(B, T) log-prob of each token given its prefix (0 outside completion tokens)."""

    def sft_step(self, batch: TokenBatch, lr: float, max_grad_norm: float, weight_decay: float) -> dict[str, float]:
        """One optimiser step on the mean cross-entropy of completion tokens; returns loss and grad norm."""

    def grpo_step(self, batch: GRPOBatch, lr: float, settings: GRPOConfig) -> dict[str, float]:
        """One optimiser step on the GRPO loss; returns loss, kl, clip fraction and grad norm."""

    def weights_are_finite(self) -> bool:
        """No NaN or inf in the trained weights (checked after every optimiser step)."""
        ...

    def save(self, folder: Path) -> None:
        """Write a checkpoint the backend's own ecosystem loads with no code of ours (plus optimizer moments)."""
