"""Batched sampling with mlx-lm's batch KV cache: left-padded prompts, positions from each row's start."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from shared.errors import SAMPLING_NOT_FINITE, DivergedError
from shared.padding import distinct_prompts, left_pad, trim_completion
from reasoning_mlx.batching import leading_padding


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             stop_ids: set[int], pad_id: int, seed: int | None) -> list[list[int]]:
    """One completion per prompt; temperature 0 is greedy. Rows stop at their first stop token.

    Written out rather than mlx-lm's batch_generate, which drops the stop token: the policy must
    see it to learn to stop.
    """
    distinct, prompt_of_row = distinct_prompts(prompts)
    ids, mask = left_pad(distinct, pad_id)
    cache = [BatchKVCache(leading_padding(mask).tolist()) for _ in model.layers]
    key = mx.random.key(seed if seed is not None else int(np.random.randint(2**31)))
    stops = np.array(sorted(stop_ids))
    logits = model(mx.array(ids), cache=cache)[:, -1]
    if len(distinct) < len(prompts):  # each distinct prompt was prefilled once: one row per sample from here
        keep(cache, prompt_of_row)
        logits = logits[mx.array(prompt_of_row)]
    output = np.full((len(prompts), max_new_tokens), pad_id, dtype=np.int64)
    active = np.arange(len(prompts))  # the rows still sampling, as the cache holds them
    finished = np.zeros(len(prompts), dtype=bool)
    for step in range(max_new_tokens):
        if temperature > 0:
            key, subkey = mx.random.split(key)
            scaled = logits.astype(mx.float32) / temperature
            token = mx.random.categorical(scaled, key=subkey)
            if not mx.isfinite(mx.logsumexp(scaled, axis=-1)).all().item():  # only diverged weights give NaN/inf
                raise DivergedError(SAMPLING_NOT_FINITE)
        else:
            token = mx.argmax(logits, axis=-1)
        token = np.where(finished, pad_id, np.array(token))
        output[active, step] = token
        finished |= np.isin(token, stops)
        if finished.all():
            break
        if finished.sum() * 4 >= len(active):  # finished rows cost as much as live ones: drop them at a quarter
            rows = np.flatnonzero(~finished)
            keep(cache, rows)
            active, token, finished = active[rows], token[rows], finished[rows]
        logits = model(mx.array(token)[:, None], cache=cache)[:, -1]
    return [trim_completion(row, stop_ids) for row in output.tolist()]


def keep(cache: list[BatchKVCache], rows: np.ndarray) -> None:
    """Go on with these rows of the batch only (a row may repeat: a group's samples share its prompt)."""
    for layer in cache:
        layer.filter(mx.array(rows))
