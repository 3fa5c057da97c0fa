"""Per-token log-probs, the SFT loss and the GRPO loss, mirroring shared/algorithms/grpo.py in torch ops."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from shared.algorithms.grpo import token_weights
from shared.algorithms.padding import PrefixBlock, TokenBatch
from shared.training.config import GRPOConfig


def to_tensors(batch: TokenBatch, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(getattr(batch, name)).to(device)
            for name in ("input_ids", "attention_mask", "position_ids", "completion_mask")}


LOGITS_PER_CHUNK = 2**22  # vocabulary logits computed at once: 16 MB of fp32, whatever the batch


def token_logprobs(model, tensors: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-prob of token t given tokens < t at completion positions (0 elsewhere), at the same
    positions generation used."""
    mask = tensors["completion_mask"]
    first = max(int(mask.any(0).int().argmax()), 1)  # the first column holding a completion token
    body, head = decoder_parts(model)
    # hidden states from the column before it on: the prompt's vocabulary projections are never needed
    hidden = body(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"],
                  position_ids=tensors["position_ids"]).last_hidden_state[:, first - 1:-1]
    return torch.nn.functional.pad(picked_logprobs(head, hidden, tensors["input_ids"][:, first:], temperature),
                                   (first, 0)) * mask


def decoder_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the decoder up to its final norm, the vocabulary projection) of a transformers causal LM, PEFT's too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


def picked_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """(B, T) log-softmax of head(hidden) (B, T, V) at `targets`, a chunk of positions at a time, each chunk's
    logits recomputed in the backward pass: the vocabulary's logits never exist for the whole batch."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    positions = max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
    parts = [checkpoint(chunk_logprobs, head, h, t, temperature, use_reentrant=False) if torch.is_grad_enabled()
             else chunk_logprobs(head, h, t, temperature)
             for h, t in zip(flat_hidden.split(positions), flat_targets.split(positions))]
    return torch.cat(parts).reshape(targets.shape)


def chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    logits = head(hidden).float() / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def prefix_logprobs(model, block: PrefixBlock, device: torch.device, temperature: float = 1.0) -> torch.Tensor:
    """(m, R) log-prob of each completion token of the block's rows (pads included: mask them), each
    distinct prompt run once: every row's completion attends to its prompt's keys and values, so the
    gradient through the prompt is the sum over the rows that share it."""
    prompts = torch.from_numpy(block.prompts).to(device)
    completions = torch.from_numpy(block.completions).to(device)
    prompt_of_row = torch.from_numpy(block.prompt_of_row).to(device)
    body, head = decoder_parts(model)
    cache = DynamicCache()
    prefill = body(input_ids=prompts, cache=cache, use_cache=True).last_hidden_state[:, -1:]
    hidden = [prefill[prompt_of_row]]  # the prompt's last position predicts each completion's first token
    if completions.shape[1] > 1:
        cache.batch_select_indices(prompt_of_row)  # indexing: differentiable, each row's prompt's keys and values
        width = prompts.shape[1]
        positions = torch.arange(width, width + completions.shape[1] - 1, device=device).expand(len(completions), -1)
        hidden.append(body(input_ids=completions[:, :-1], position_ids=positions, cache=cache,
                           use_cache=True).last_hidden_state)
    return picked_logprobs(head, torch.cat(hidden, 1), completions, temperature)


def sft_loss(model, tensors: dict[str, torch.Tensor], total_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of completion tokens over the batch's completion-token count."""
    return -token_logprobs(model, tensors).sum() / total_tokens


def grpo_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, settings: GRPOConfig, ref_logprobs: torch.Tensor | None,
              total_sequences: int, total_tokens: int, max_completion_tokens: int) -> torch.Tensor:
    """shared.algorithms.grpo.grpo_loss in torch: the per-token loss, weighted by grpo.token_weights."""
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
