"""Per-token log-probs, the SFT loss and the GRPO loss, mirroring shared/grpo.py in torch ops."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from shared.config import GRPOConfig
from shared.grpo import token_weights
from shared.padding import PrefixBlock, TokenBatch


def to_tensors(batch: TokenBatch, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(getattr(batch, name)).to(device)
            for name in ("input_ids", "attention_mask", "position_ids", "completion_mask")}


def token_logprobs(model, tensors: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-prob of token t given tokens < t at completion positions (0 elsewhere), at the same
    positions generation used."""
    mask = tensors["completion_mask"]
    first = max(int(mask.any(0).int().argmax()), 1)  # the first column holding a completion token
    # logits from the column before it on: the prompt's vocabulary projections are never used
    logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                   position_ids=tensors["position_ids"], logits_to_keep=mask.shape[1] - first + 1).logits[:, :-1]
    return torch.nn.functional.pad(picked_logprobs(logits, tensors["input_ids"][:, first:], temperature),
                                   (first, 0)) * mask


def picked_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T) log-softmax of `logits` (B, T, V) at `targets`, in row chunks of at most 2**24 logits: a 150k
    vocabulary would not fit at once."""
    rows = max(1, 2**24 // (logits.shape[1] * logits.shape[2]))
    parts = []
    for part_logits, part_targets in zip(logits.split(rows), targets.split(rows)):
        part_logits = part_logits.float() / temperature
        parts.append(part_logits.gather(-1, part_targets[..., None]).squeeze(-1) - part_logits.logsumexp(-1))
    return torch.cat(parts)


def prefix_logprobs(model, block: PrefixBlock, device: torch.device, temperature: float = 1.0) -> torch.Tensor:
    """(m, R) log-prob of each completion token of the block's rows (pads included: mask them), each
    distinct prompt run once: every row's completion attends to its prompt's keys and values, so the
    gradient through the prompt is the sum over the rows that share it."""
    prompts = torch.from_numpy(block.prompts).to(device)
    completions = torch.from_numpy(block.completions).to(device)
    prompt_of_row = torch.from_numpy(block.prompt_of_row).to(device)
    cache = DynamicCache()
    prefill = model(input_ids=prompts, cache=cache, use_cache=True, logits_to_keep=1)
    logits = [prefill.logits[prompt_of_row]]  # the prompt's last position predicts each completion's first token
    if completions.shape[1] > 1:
        cache.batch_select_indices(prompt_of_row)  # indexing: differentiable, each row's prompt's keys and values
        width = prompts.shape[1]
        positions = torch.arange(width, width + completions.shape[1] - 1, device=device).expand(len(completions), -1)
        logits.append(model(input_ids=completions[:, :-1], position_ids=positions,
                            cache=cache, use_cache=True).logits)
    return picked_logprobs(torch.cat(logits, 1), completions, temperature)


def sft_loss(model, tensors: dict[str, torch.Tensor], total_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of completion tokens over the batch's completion-token count."""
    return -token_logprobs(model, tensors).sum() / total_tokens


def grpo_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, settings: GRPOConfig, ref_logprobs: torch.Tensor | None,
              total_sequences: int, total_tokens: int, max_completion_tokens: int) -> torch.Tensor:
    """shared.grpo.grpo_loss in torch: the per-token loss, weighted by shared.grpo.token_weights."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    clipped = ratio.clamp(1 - settings.epsilon, 1 + settings.epsilon)
    advantages = advantages[:, None]
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    if settings.beta:
        delta = ref_logprobs - new_logprobs
        per_token = per_token + settings.beta * (torch.exp(delta) - delta - 1)
    weights = token_weights(mask.to(new_logprobs.dtype).cpu().numpy(), settings.loss_variant, total_sequences,
                            total_tokens, max_completion_tokens)
    return (per_token * torch.from_numpy(weights).to(per_token.device)).sum()
