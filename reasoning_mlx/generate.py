"""Batched sampling with mlx-lm's batch KV cache: left-padded prompts, positions from each row's start,
and speculative decoding from n-gram drafts (shared/algorithms/drafts.py)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from shared.algorithms.drafts import NgramDrafter, decode, position_uniforms
from shared.algorithms.padding import distinct_prompts, left_pad, trim_completion
from shared.runtime.errors import SAMPLING_NOT_FINITE, DivergedError
from reasoning_mlx.batching import leading_padding


def sample(logits: mx.array, temperature: float, uniforms: mx.array) -> mx.array:
    """A token per row of logits (..., V): the argmax at temperature 0, else the inverse CDF at `uniforms` (...)."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    cumulative = mx.cumsum(mx.softmax(logits.astype(mx.float32) / temperature, axis=-1), axis=-1)
    if not mx.isfinite(cumulative[..., -1]).all().item():  # only diverged weights give NaN/inf
        raise DivergedError(SAMPLING_NOT_FINITE)
    draw = (uniforms * cumulative[..., -1])[..., None]
    return mx.minimum((cumulative <= draw).sum(-1), logits.shape[-1] - 1)


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             stop_ids: set[int], pad_id: int, seed: int | None, drafter: NgramDrafter | None = None,
             stats: dict | None = None) -> list[list[int]]:
    """One completion per prompt; temperature 0 is greedy. Rows stop at their first stop token (kept:
    the policy must see it to learn to stop, which mlx-lm's batch_generate drops).

    Each position of a row is drawn with its own uniform number (seeded, the same numbers on
    PyTorch), so with a `drafter` (speculative decoding) the output is token-for-token the plain
    decoder's. A row that keeps fewer of the tokens a forward ran has the rest rolled off the end of
    its cache into its left padding.
    """
    distinct, prompt_of_row = distinct_prompts(prompts)
    ids, mask = left_pad(distinct, pad_id)
    cache = [BatchKVCache(leading_padding(mask).tolist()) for _ in model.layers]
    uniforms = mx.array(position_uniforms(len(prompts), max_new_tokens, seed))
    logits = model(mx.array(ids), cache=cache)[:, -1]
    if len(distinct) < len(prompts):  # each distinct prompt was prefilled once: one row per sample from here
        keep(cache, prompt_of_row)
        logits = logits[mx.array(prompt_of_row)]
    drafter = drafter if drafter is not None and len(prompts) <= drafter.most_rows else None
    if drafter is not None:
        drafter.start(prompts, prompt_of_row)
    width = [0]

    def run(ids: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        width[0] = ids.shape[1]
        logits = model(mx.array(ids), cache=cache)
        return np.array(sample(logits, temperature, uniforms[mx.array(rows)[:, None], mx.array(positions)]))

    def commit(counts: np.ndarray) -> None:
        unused = width[0] - counts
        if unused.any():
            for layer in cache:
                layer.prepare(right_padding=unused.tolist())
                layer.finalize()

    first = np.array(sample(logits, temperature, uniforms[:, 0]))
    rows = decode(first, run, commit, lambda rows: keep(cache, rows), max_new_tokens, stop_ids, pad_id, drafter,
                  stats)
    return [trim_completion(row, stop_ids) for row in rows]


def keep(cache: list[BatchKVCache], rows: np.ndarray) -> None:
    """Go on with these rows of the batch only (a row may repeat: a group's samples share its prompt)."""
    for layer in cache:
        layer.filter(mx.array(rows))
