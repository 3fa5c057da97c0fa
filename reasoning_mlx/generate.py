"""Batched sampling with mlx-lm's batch KV cache: left-padded prompts, positions from each row's start."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from shared.backend import leading_padding, left_pad, trim_completion


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             stop_ids: set[int], pad_id: int, seed: int | None) -> list[list[int]]:
    """One completion per prompt; temperature 0 is greedy. Rows stop at their first stop token.

    Written out rather than mlx-lm's batch_generate, which drops the stop token: the policy must
    see it to learn to stop.
    """
    ids, mask = left_pad(prompts, pad_id)
    cache = [BatchKVCache(leading_padding(mask).tolist()) for _ in model.layers]
    key = mx.random.key(seed if seed is not None else int(np.random.randint(2**31)))
    stops = mx.array(sorted(stop_ids))
    logits = model(mx.array(ids), cache=cache)[:, -1]
    finished = mx.zeros((len(prompts),), dtype=mx.bool_)
    columns = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            key, subkey = mx.random.split(key)
            token = mx.random.categorical(logits.astype(mx.float32) / temperature, key=subkey)
        else:
            token = mx.argmax(logits, axis=-1)
        token = mx.where(finished, pad_id, token)
        columns.append(token)
        finished = finished | (token[:, None] == stops[None]).any(axis=1)
        if finished.all().item():
            break
        logits = model(token[:, None], cache=cache)[:, -1]
    rows = np.array(mx.stack(columns, axis=1)).tolist()
    return [trim_completion(row, stop_ids) for row in rows]
