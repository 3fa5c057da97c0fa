"""Token-id lists packed into padded numpy blocks, the form both backends consume."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def trim_completion(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a sampled row after its first stop token (kept: the policy must learn to stop)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


@dataclass
class PrefixBlock:
    """Rows of a packed batch whose prompts have one length, each distinct prompt once: the shared-prefix
    pass runs `prompts` through the model once, then each row's completion on its prompt's keys and values.

    `completions` (m, R) are the batch's `columns` of those `rows`, right-padded; log-probs computed in
    that (m, R) layout go back to `columns` of the batch.
    """
    rows: np.ndarray  # (m,) rows of the batch
    prompts: np.ndarray  # (n, P)
    prompt_of_row: np.ndarray  # (m,) index into prompts
    completions: np.ndarray  # (m, R)
    columns: slice


def prefix_blocks(batch: TokenBatch, max_rows: int) -> list[PrefixBlock]:
    """A batch from pack_batch cut into PrefixBlocks of at most `max_rows` rows, rows sharing a prompt
    kept together (a GRPO group's G rows are contiguous), each block's completions cut to its longest."""
    completion_columns = batch.completion_mask.any(0)
    start = int(completion_columns.argmax()) if completion_columns.any() else batch.input_ids.shape[1]
    prompt_lengths = batch.attention_mask[:, :start].sum(1)
    completion_lengths = batch.completion_mask.sum(1)
    blocks = []
    for length in np.unique(prompt_lengths):
        same_length = np.flatnonzero(prompt_lengths == length)
        for first in range(0, len(same_length), max_rows):
            rows = same_length[first:first + max_rows]
            distinct, prompt_of_row = distinct_prompts([batch.input_ids[row, start - length:start].tolist()
                                                        for row in rows])
            prompts = np.array(distinct, dtype=batch.input_ids.dtype).reshape(len(distinct), length)
            columns = slice(start, start + max(int(completion_lengths[rows].max()), 1))
            blocks.append(PrefixBlock(rows, prompts, prompt_of_row, batch.input_ids[rows, columns], columns))
    return blocks


LOGITS_PER_PASS = 2**26  # 256 MB of fp32 logits: 9 SmolLM2 rows of 140 tokens


def rows_per_pass(max_rows: int, columns: int, vocab_size: int) -> int:
    """Rows per forward pass: at most `max_rows`, and no more than keeps the pass's logits (rows x
    columns x vocabulary) near LOGITS_PER_PASS. Past that the log-softmax over a large vocabulary and
    its gradient stream through memory: a GRPO step of 64 SmolLM2 rows (vocabulary 49,152, ~140
    columns) took 33.3 s in one pass and 21.8 s in passes of 8 (same rows, same numbers)."""
    return max(1, min(max_rows, LOGITS_PER_PASS // max(1, columns * vocab_size)))
