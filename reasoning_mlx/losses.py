"""Per-token log-probs, the SFT loss and the GRPO loss, mirroring shared/algorithms/grpo.py in mlx ops.

Batches arrive right-padded (see reasoning_mlx.batching.roll_rows): mlx-lm models take no attention mask,
and with every row starting at position 0 plain causal attention is all a row needs.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from shared.algorithms.grpo import token_weights
from shared.training.config import GRPOConfig


def token_logprobs(model, input_ids: mx.array, temperature: float = 1.0) -> mx.array:
    """(B, T) log-prob of token t given tokens < t (column 0 is 0)."""
    return mx.pad(picked_logprobs(model(input_ids)[:, :-1], input_ids[:, 1:], temperature), [(0, 0), (1, 0)])


def picked_logprobs(logits: mx.array, targets: mx.array, temperature: float) -> mx.array:
    """(B, T) log-softmax of `logits` (B, T, V) at `targets`, in float32."""
    logits = logits.astype(mx.float32) / temperature
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


class PrefixCache(KVCache):
    """mlx-lm's KV cache written by concatenation rather than into a preallocated buffer, so that
    gradients flow back through the prompt's keys and values."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        return keys, values


def prefix_logprobs(model, prompts: mx.array, prompt_of_row: mx.array, completions: mx.array,
                    temperature: float = 1.0) -> mx.array:
    """(m, R) log-prob of each completion token (pads included: mask them), each distinct prompt (n, P)
    run once: every row's completion attends to its prompt's keys and values, so the gradient through
    the prompt is the sum over the rows that share it."""
    cache = [PrefixCache() for _ in model.layers]
    logits = [model(prompts, cache=cache)[:, -1:][prompt_of_row]]  # the prompt's last position: first tokens
    if completions.shape[1] > 1:
        for layer in cache:  # indexing: differentiable, each row gets its prompt's keys and values
            layer.keys, layer.values = layer.keys[prompt_of_row], layer.values[prompt_of_row]
        logits.append(model(completions[:, :-1], cache=cache))
    return picked_logprobs(mx.concatenate(logits, axis=1), completions, temperature)


def grpo_loss(new_logprobs: mx.array, old_logprobs: mx.array, advantages: mx.array, mask: mx.array,
              settings: GRPOConfig, ref_logprobs: mx.array | None,
              total_sequences: int, total_tokens: int, max_completion_tokens: int) -> mx.array:
    """shared.algorithms.grpo.grpo_loss in mlx: the per-token loss, weighted by shared.algorithms.grpo.token_weights."""
    ratio = mx.exp(new_logprobs - old_logprobs)
    clipped = mx.clip(ratio, 1 - settings.epsilon, 1 + settings.epsilon)
    advantages = advantages[:, None]
    per_token = -mx.minimum(ratio * advantages, clipped * advantages)
    if settings.beta:
        delta = ref_logprobs - new_logprobs
        per_token = per_token + settings.beta * (mx.exp(delta) - delta - 1)
    weights = token_weights(np.array(mask), settings.loss_variant, total_sequences, total_tokens,
                            max_completion_tokens)
    return (per_token * mx.array(weights)).sum()
