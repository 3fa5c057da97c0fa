"""Batched sampling with a KV cache, positions following the left-padding mask, and speculative
decoding from n-gram drafts (shared/drafts.py) where the lean decoder runs the model."""
from __future__ import annotations

import time

import numpy as np
import torch
from transformers import DynamicCache

from shared.drafts import DRAFT_LENGTHS, NO_DRAFT, NgramDrafter, accepted_drafts
from shared.errors import SAMPLING_NOT_FINITE, DivergedError
from shared.padding import distinct_prompts, left_pad, trim_completion
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
             stop_ids: set[int], pad_id: int, generator: torch.Generator | None, lean: bool = True,
             drafter: NgramDrafter | None = None, stats: dict | None = None) -> list[list[int]]:
    """One completion per prompt; temperature 0 is greedy. Rows stop at their first stop token.

    The token at each position of a row is drawn with that position's own uniform number, so that
    with a `drafter` (speculative decoding; the lean decoder only) the output is token-for-token the
    plain decoder's: a drafted token is kept exactly when it is what the plain decoder draws there.
    `stats` receives the counts of forwards, of rows run in them, of drafted and of accepted tokens.
    """
    device = next(model.parameters()).device
    distinct, prompt_of_row = distinct_prompts(prompts)
    ids, mask = (torch.from_numpy(a).to(device) for a in left_pad(distinct, pad_id))
    uniforms = torch.rand(len(prompts), max_new_tokens, generator=generator, device=device)
    forward = model_forward(model, (mask == 0).sum(1), ids.shape[1] + max_new_tokens + max(DRAFT_LENGTHS), lean)
    drafter = drafter if forward.parallel else None
    logits = forward(ids)
    forward.commit()
    if len(distinct) < len(prompts):  # each distinct prompt was prefilled once: one row per sample from here
        forward.keep(torch.from_numpy(prompt_of_row).to(device))
        logits = logits[torch.from_numpy(prompt_of_row).to(device)]
    if drafter is not None:
        drafter.start(prompts, prompt_of_row)
        draft_length = drafter.length_for((len(prompts), max_new_tokens, temperature > 0))
        length = draft_length.choose()
    began, length = time.perf_counter(), length if drafter is not None else 0
    stops = np.array(sorted(stop_ids))
    output = np.full((len(prompts), max_new_tokens), pad_id, dtype=np.int64)
    written = np.zeros(len(prompts), dtype=np.int64)  # tokens in each row's output so far
    active = np.arange(len(prompts))  # the rows the forward holds
    done = np.zeros(len(prompts), dtype=bool)  # of those, the finished ones (fed padding until dropped)
    counts = {"forwards": 0, "row_forwards": 0, "drafted": 0, "accepted": 0}

    def append(rows: np.ndarray, tokens: list) -> None:
        for row, row_tokens in zip(rows, tokens):
            output[row, written[row]:written[row] + len(row_tokens)] = row_tokens
            written[row] += len(row_tokens)
            if drafter is not None:
                drafter.extend(row, list(row_tokens))

    pending = sample(logits, temperature, uniforms[:, 0]).cpu().numpy()  # drawn, not yet run through the model
    while True:
        append(active[~done], pending[~done, None])
        done |= np.isin(pending, stops) | (written[active] >= max_new_tokens)
        if done.all():
            break
        if done.sum() * 4 >= len(active):  # finished rows cost as much as live ones: drop them at a quarter
            keep = np.flatnonzero(~done)
            forward.keep(torch.from_numpy(keep).to(device))
            active, pending, done = active[keep], pending[keep], done[keep]
        room = np.where(done, 0, max_new_tokens - written[active] - 1)
        drafts = draft_tokens(drafter, active, length, room, set(stop_ids))
        fed = np.concatenate([np.where(done, pad_id, pending)[:, None], np.where(drafts == NO_DRAFT, pad_id, drafts)],
                             axis=1)
        logits = forward(torch.from_numpy(fed).to(device), every_position=True)
        positions = np.minimum(written[active][:, None] + np.arange(fed.shape[1]), max_new_tokens - 1)
        drawn = sample(logits, temperature, uniforms[torch.from_numpy(active)[:, None],
                                                     torch.from_numpy(positions)]).cpu().numpy()
        kept = accepted_drafts(drawn, drafts)
        forward.commit(torch.from_numpy(kept + 1).to(device))  # the pending token and the accepted drafts
        append(active[~done], [d[:k] for d, k in zip(drafts[~done], kept[~done])])
        live, accepted = int((~done).sum()), int(kept.sum())
        pending = drawn[np.arange(len(active)), kept]
        done |= np.array([k > 0 and d[k - 1] in stop_ids for d, k in zip(drafts, kept)], dtype=bool)
        for name, count in (("forwards", 1), ("row_forwards", live), ("drafted", int((drafts != NO_DRAFT).sum())),
                            ("accepted", accepted)):
            counts[name] += count
    completions = [trim_completion(row[:count], stop_ids) for row, count in zip(output.tolist(), written)]
    if drafter is not None:
        drafter.finish(completions)
        draft_length.record(length, sum(map(len, completions)), time.perf_counter() - began)
    if stats is not None:
        stats.update(counts)
    return completions


def draft_tokens(drafter: NgramDrafter | None, rows: np.ndarray, length: int, room: np.ndarray,
                 stops: set[int]) -> np.ndarray:
    """(rows, longest draft) of drafted tokens, NO_DRAFT after a row's end: at most `length` per row,
    no more than its `room`, none after a stop token."""
    drafts = [drafter.draft(row, min(length, int(space))) if length and space > 0 else []
              for row, space in zip(rows, room)]
    drafts = [next((d[:i + 1] for i, token in enumerate(d) if token in stops), d) for d in drafts]
    table = np.full((len(rows), max((len(d) for d in drafts), default=0)), NO_DRAFT, dtype=np.int64)
    for index, draft in enumerate(drafts):
        table[index, :len(draft)] = draft
    return table
