"""Per-token log-probs, the SFT loss and the GRPO loss, mirroring shared/grpo.py in mlx ops.

Batches arrive right-padded (see reasoning_mlx.batching.roll_rows): mlx-lm models take no attention mask,
and with every row starting at position 0 plain causal attention is all a row needs.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from shared.config import GRPOConfig
from shared.grpo import token_weights


def token_logprobs(model, input_ids: mx.array, temperature: float = 1.0) -> mx.array:
    """(B, T) log-prob of token t given tokens < t (column 0 is 0)."""
    logits = model(input_ids)[:, :-1].astype(mx.float32) / temperature
    targets = input_ids[:, 1:]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return mx.pad(picked - mx.logsumexp(logits, axis=-1), [(0, 0), (1, 0)])


def grpo_loss(new_logprobs: mx.array, old_logprobs: mx.array, advantages: mx.array, mask: mx.array,
              settings: GRPOConfig, ref_logprobs: mx.array | None,
              total_sequences: int, total_tokens: int, max_completion_tokens: int) -> mx.array:
    """shared.grpo.grpo_loss in mlx: the per-token loss, weighted by shared.grpo.token_weights."""
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
