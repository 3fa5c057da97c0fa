"""GRPO math as numpy reference implementations; each backend mirrors `grpo_loss` in its own ops."""
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


def aggregate(per_token: np.ndarray, mask: np.ndarray, variant: str, max_completion_tokens: int) -> float:
    """Reduce (B, T) per-token losses over completion tokens as the variant says."""
    mask = mask.astype(per_token.dtype)
    if variant == "grpo":  # per-sequence mean, then mean over sequences
        return float(((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean())
    if variant == "dapo":  # token-level mean over the whole batch
        return float((per_token * mask).sum() / max(mask.sum(), 1))
    if variant == "dr_grpo":  # Dr. GRPO: constant normaliser, no length bias
        return float((per_token * mask).sum() / (per_token.shape[0] * max_completion_tokens))
    raise ValueError(f"unknown loss variant {variant!r}; choose from {', '.join(LOSS_VARIANTS)}")


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
