"""Batched sampling with a KV cache, positions following the left-padding mask, and speculative
decoding from n-gram drafts (shared/algorithms/drafts.py) where the lean decoder runs the model."""
from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from shared.algorithms.drafts import DRAFT_LENGTHS, NgramDrafter, decode, position_uniforms
from shared.algorithms.padding import distinct_prompts, left_pad, trim_completion
from shared.runtime.errors import SAMPLING_NOT_FINITE, DivergedError
from reasoning_torch.decoder import LeanDecoder, supports


class TransformersForward:
    """The model's own forward with a transformers cache: any architecture, every row committing
    every token it runs."""

    parallel = False

    def __init__(self, model, padding: torch.Tensor, capacity: int):
        self.model, self.cache, self.padding, self.mask = model, DynamicCache(), padding, None

    def __call__(self, ids: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        new = torch.ones_like(ids) if self.mask is not None else \
            (torch.arange(ids.shape[1], device=ids.device) >= self.padding[:, None]).long()
        mask = new if self.mask is None else torch.cat([self.mask, new], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        # the last position's logits only, unless asked: all of them made the prefill 3.7x slower on Qwen2.5-0.5B
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                            use_cache=True, logits_to_keep=0 if every_position else 1).logits
        self.mask, self.running = mask, ids.shape[1]
        return logits if every_position else logits[:, -1]

    def commit(self, counts: torch.Tensor | None = None) -> None:
        if counts is not None and bool((counts != self.running).any()):
            raise ValueError("the transformers forward keeps every token it ran")

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


def model_forward(model, padding: torch.Tensor, capacity: int, lean: bool = True):
    """The lean decoder where it computes what the model computes, else the model's own forward.

    Either is called as forward(new ids (B, T)) -> next-token logits, then forward.commit(), and
    forward.keep(rows) drops the other rows from its cache."""
    return LeanDecoder(model, padding, capacity) if lean and supports(model) else \
        TransformersForward(model, padding, capacity)


def sample(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """A token per row of logits (..., V): the argmax at temperature 0, else the inverse CDF at `uniforms` (...)."""
    if temperature <= 0:
        return logits.argmax(-1)
    # inverse CDF: one uniform draw per token, where multinomial draws one per vocabulary entry (20x slower)
    cumulative = torch.softmax(logits.float() / temperature, dim=-1).cumsum(-1)
    if not bool(torch.isfinite(cumulative[..., -1]).all()):  # only diverged weights give NaN/inf
        raise DivergedError(SAMPLING_NOT_FINITE)
    draw = (uniforms * cumulative[..., -1])[..., None].contiguous()
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             stop_ids: set[int], pad_id: int, seed: int | None, lean: bool = True,
             drafter: NgramDrafter | None = None, stats: dict | None = None) -> list[list[int]]:
    """One completion per prompt; temperature 0 is greedy. Rows stop at their first stop token.

    The token at each position of a row is drawn with that position's own uniform number (seeded, the
    same numbers on MLX), so that with a `drafter` (speculative decoding; the lean decoder only) the
    output is token-for-token the plain decoder's: a drafted token is kept exactly when it is what the
    plain decoder draws there.
    `stats` receives the counts of forwards, of rows run in them, of drafted and of accepted tokens.
    """
    device = next(model.parameters()).device
    distinct, prompt_of_row = distinct_prompts(prompts)
    ids, mask = (torch.from_numpy(a).to(device) for a in left_pad(distinct, pad_id))
    uniforms = torch.from_numpy(position_uniforms(len(prompts), max_new_tokens, seed)).to(device)
    forward = model_forward(model, (mask == 0).sum(1), ids.shape[1] + max_new_tokens + max(DRAFT_LENGTHS), lean)
    drafter = drafter if forward.parallel and drafter is not None and len(prompts) <= drafter.most_rows else None
    logits = forward(ids)
    forward.commit()
    if len(distinct) < len(prompts):  # each distinct prompt was prefilled once: one row per sample from here
        forward.keep(torch.from_numpy(prompt_of_row).to(device))
        logits = logits[torch.from_numpy(prompt_of_row).to(device)]
    if drafter is not None:
        drafter.start(prompts, prompt_of_row)

    def run(ids: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        logits = forward(torch.from_numpy(ids).to(device), every_position=True)
        return sample(logits, temperature, uniforms[torch.from_numpy(rows)[:, None],
                                                     torch.from_numpy(positions)]).cpu().numpy()

    def commit(counts: np.ndarray) -> None:
        forward.commit(torch.from_numpy(counts).to(device))

    def keep(rows: np.ndarray) -> None:
        forward.keep(torch.from_numpy(rows).to(device))

    first = sample(logits, temperature, uniforms[:, 0]).cpu().numpy()
    rows = decode(first, run, commit, keep, max_new_tokens, stop_ids, pad_id, drafter, stats)
    return [trim_completion(row, stop_ids) for row in rows]
