"""GRPO math in numpy: advantages, the per-token loss weights of each variant (the one place they are
written; both backends use them), and `grpo_loss` as the reference each backend's per-token loss mirrors."""
from __future__ import annotations

import numpy as np

LOSS_VARIANTS = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: np.ndarray, scale_by_std: bool = True, eps: float = 1e-4) -> np.ndarray:
    """Rewards (groups, G) -> advantages: reward minus its group's mean, over the group's std if asked.

    A group whose samples all scored the same gets zero advantage: nothing to prefer.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if not scale_by_std:
        return centred  # Dr. GRPO: no std scaling, which biases toward easy and hard groups
    return centred / (rewards.std(axis=1, ddof=0, keepdims=True) + eps)


def per_token_kl(new_logprobs: np.ndarray, ref_logprobs: np.ndarray) -> np.ndarray:
    """k3 estimator of KL(policy || reference), unbiased and non-negative (Schulman)."""
    delta = ref_logprobs - new_logprobs
    return np.exp(delta) - delta - 1.0


def token_weights(mask: np.ndarray, variant: str, total_sequences: int, total_tokens: int,
                  max_completion_tokens: int) -> np.ndarray:
    """(B, T) weight of each completion token's loss: the variant's loss is (per-token loss * weights).sum().

    The totals are the whole batch's, so micro-batches of it add up to the batch's loss exactly. Each
    weight is computed in the order autograd would through the variant's divisions, in the mask's
    float dtype (float32 for an integer mask).
    """
    mask = np.asarray(mask)
    mask = mask.astype(mask.dtype if np.issubdtype(mask.dtype, np.floating) else np.float32)
    number = mask.dtype.type
    if variant == "grpo":  # per-sequence mean, then mean over sequences
        lengths = np.maximum(mask.sum(1, keepdims=True), number(1))
        return number(1) / number(total_sequences) / lengths * mask
    if variant == "dapo":  # token-level mean over the whole batch
        return number(1) / number(max(total_tokens, 1)) * mask
    if variant == "dr_grpo":  # Dr. GRPO: constant normaliser, no length bias
        return number(1) / number(total_sequences * max_completion_tokens) * mask
    raise ValueError(f"unknown loss variant {variant!r}; choose from {', '.join(LOSS_VARIANTS)}")


def aggregate(per_token: np.ndarray, mask: np.ndarray, variant: str, max_completion_tokens: int) -> float:
    """Reduce (B, T) per-token losses over completion tokens as the variant says."""
    mask = np.asarray(mask).astype(per_token.dtype)
    weights = token_weights(mask, variant, per_token.shape[0], int(mask.sum()), max_completion_tokens)
    return float((per_token * weights).sum())


def grpo_loss(new_logprobs: np.ndarray, old_logprobs: np.ndarray, advantages: np.ndarray,
              mask: np.ndarray, *, variant: str = "grpo", epsilon: float = 0.2, beta: float = 0.0,
              ref_logprobs: np.ndarray | None = None, max_completion_tokens: int = 1) -> float:
    """Clipped-ratio policy-gradient loss with optional KL to the reference, aggregated by variant.

    new/old/ref log-probs and mask are (B, T) over completion tokens; advantages is (B,).
    """
    ratio = np.exp(new_logprobs - old_logprobs)
    clipped = np.clip(ratio, 1 - epsilon, 1 + epsilon)
    advantages = np.asarray(advantages)[:, None]
    per_token = -np.minimum(ratio * advantages, clipped * advantages)
    if beta:
        per_token = per_token + beta * per_token_kl(new_logprobs, ref_logprobs)
    return aggregate(per_token, mask, variant, max_completion_tokens)


def policy_drift(new_logprobs: np.ndarray, old_logprobs: np.ndarray | None, ref_logprobs: np.ndarray | None,
                 mask: np.ndarray, epsilon: float) -> dict[str, float]:
    """Per completion token: the fraction whose ratio to the sampling policy is clipped, and the k3
    KL to the reference (0 where there is no old or reference policy)."""
    tokens = max(float(mask.sum()), 1.0)
    clipped = 0.0 if old_logprobs is None else float(
        ((np.abs(np.exp(new_logprobs - old_logprobs) - 1) > epsilon) * mask).sum())
    kl = 0.0 if ref_logprobs is None else float((per_token_kl(new_logprobs, ref_logprobs) * mask).sum())
    return {"clip_fraction": clipped / tokens, "kl": kl / tokens}


def rows_with_signal(advantages: np.ndarray, beta: float) -> np.ndarray:
    """The rows whose loss has a gradient. Without a KL term a zero advantage makes every token's
    loss -min(r * 0, clip(r) * 0) = 0, so a group whose samples all scored the same teaches nothing."""
    advantages = np.asarray(advantages)
    return np.arange(len(advantages)) if beta else np.flatnonzero(advantages)
