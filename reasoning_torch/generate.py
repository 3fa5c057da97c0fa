"""Batched sampling with a KV cache, positions following the left-padding mask."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from shared.errors import SAMPLING_NOT_FINITE, DivergedError
from shared.padding import distinct_prompts, left_pad, trim_completion
from reasoning_torch.decoder import LeanDecoder, supports


class TransformersForward:
    """The model's own forward with a transformers cache: any architecture."""

    def __init__(self, model):
        self.model, self.cache = model, DynamicCache()

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # the last position's logits only: all of them made the prefill 3.7x slower on Qwen2.5-0.5B's vocabulary
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def next_token_logits(model, batch_size: int, capacity: int, lean: bool = True):
    """The lean decoder where it computes what the model computes, else the model's own forward.

    Either is called as forward(new ids (B, T), mask of every position so far, new positions) ->
    next-token logits (B, V), and forward.keep(rows) drops the other rows from its cache."""
    return LeanDecoder(model, batch_size, capacity) if lean and supports(model) else TransformersForward(model)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # inverse CDF: one uniform draw per row, where multinomial draws one per vocabulary entry (20x slower)
    cumulative = torch.softmax(logits.float() / temperature, dim=-1).cumsum(-1)
    if not bool(torch.isfinite(cumulative[:, -1]).all()):  # only diverged weights give NaN/inf
        raise DivergedError(SAMPLING_NOT_FINITE)
    draw = torch.rand(len(logits), 1, generator=generator, device=logits.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, draw, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             stop_ids: set[int], pad_id: int, generator: torch.Generator | None, lean: bool = True) -> list[list[int]]:
    """One completion per prompt; temperature 0 is greedy. Rows stop at their first stop token."""
    device = next(model.parameters()).device
    distinct, prompt_of_row = distinct_prompts(prompts)
    ids, mask = (torch.from_numpy(a).to(device) for a in left_pad(distinct, pad_id))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(stop_ids), device=device)
    forward = next_token_logits(model, len(distinct), ids.shape[1] + max_new_tokens, lean)
    logits = forward(ids, mask, positions)
    if len(distinct) < len(prompts):  # each distinct prompt was prefilled once: one row per sample from here
        rows = torch.from_numpy(prompt_of_row).to(device)
        forward.keep(rows)
        logits, mask, positions = logits[rows], mask[rows], positions[rows]
    output = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    active = torch.arange(len(prompts), device=device)  # the rows still sampling, as the forward holds them
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = torch.where(finished, pad_id, sample(logits, temperature, generator))
        output[active, step] = token
        finished |= torch.isin(token, stops)
        done = int(finished.sum())
        if done == len(active):
            break
        if done * 4 >= len(active):  # finished rows cost as much as live ones: drop them once they are a quarter
            keep = (~finished).nonzero().squeeze(1)
            forward.keep(keep)
            active, token, mask, positions, finished = (t[keep] for t in (active, token, mask, positions, finished))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits = forward(token[:, None], mask, positions)
    return [trim_completion(row, stop_ids) for row in output.tolist()]
