"""Speculative decoding without a draft model: drafts from n-gram lookup, the acceptance rule, and how
many tokens to draft.

A row's draft is what followed the most recent earlier occurrence of its last n tokens (n from
`longest` down to `shortest`), looked up in the row's own prompt and completion first, then in its
group's (the rows sharing its prompt), then in every row and in the completions of earlier calls
(the traces are regular: most of a completion repeats its prompt, its own earlier lines, or the
boilerplate every completion writes).

The acceptance rule couples the draft with the sample the plain decoder would draw at the same
position from the same uniform number: a drafted token is accepted exactly when it is that sample.
For a draft that proposes one token with certainty this is the speculative-sampling rule (accept with
probability p(d); on rejection the sample is distributed as p without d, renormalised), and it makes
the output token-for-token the plain decoder's, greedy or sampled, whatever was drafted.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

NO_DRAFT = -1
DRAFT_LENGTHS = (0, 2, 4, 8)


def accepted_drafts(samples: np.ndarray, drafts: np.ndarray) -> np.ndarray:
    """(B,) how many leading drafted tokens each row keeps: `samples` (B, K+1) are the tokens the
    model draws after the row's pending token and after each of its drafts (B, K), NO_DRAFT where a
    row drafted fewer. The row then appends samples[:count + 1]."""
    if drafts.shape[1] == 0:
        return np.zeros(len(samples), dtype=np.int64)
    matches = samples[:, :drafts.shape[1]] == drafts
    return np.where(matches.all(1), drafts.shape[1], matches.argmin(1))


class NgramIndex:
    """The most recent end of each n-gram (n in `lengths`) in some token lists."""

    def __init__(self, lengths: range):
        self.lengths = lengths
        self.ends: dict[tuple[int, ...], tuple[list[int], int]] = {}

    def add(self, tokens: list[int], start: int = 0) -> None:
        """Index the n-grams of `tokens` (a list that may grow later) ending at `start`.. and followed by
        a token: a row's own last n tokens are not found as their own most recent occurrence."""
        for end in range(max(start, 1), len(tokens)):
            for n in self.lengths:
                if end >= n:
                    self.ends[tuple(tokens[end - n:end])] = (tokens, end)

    def continuation(self, suffix: tuple[int, ...], count: int) -> list[int]:
        found = self.ends.get(suffix)
        return [] if found is None else found[0][found[1]:found[1] + count]


class DraftLength:
    """How many tokens to draft per forward, learnt over the calls of one shape: each length's tokens
    per second (averaged over its recent calls), climbing from plain decoding (0) to the next longer
    length while that is faster; every `explore`-th call tries a neighbour of the best again. So
    drafting turns itself off where it loses (on a CPU, large batches are matmul-bound and gain
    little from verifying several tokens at once) at the cost of one call at the shortest length."""

    def __init__(self, lengths: tuple[int, ...] = DRAFT_LENGTHS, explore: int = 16):
        self.lengths, self.explore = lengths, explore
        self.speed: dict[int, float] = {}
        self.calls = 0

    def choose(self) -> int:
        self.calls += 1
        if not self.speed:
            return self.lengths[0]
        best = self.lengths.index(max(self.speed, key=self.speed.get))
        if best + 1 < len(self.lengths) and self.lengths[best + 1] not in self.speed:
            return self.lengths[best + 1]
        if self.calls % self.explore == 0:
            neighbours = [i for i in (best - 1, best + 1) if 0 <= i < len(self.lengths)]
            return self.lengths[neighbours[self.calls // self.explore % len(neighbours)]]
        return self.lengths[best]

    def record(self, length: int, tokens: int, seconds: float) -> None:
        speed = tokens / max(seconds, 1e-9)
        self.speed[length] = speed if length not in self.speed else 0.5 * self.speed[length] + 0.5 * speed


class NgramDrafter:
    """Drafts for the rows of a generate call, from the rows themselves, their groups, and the
    completions of earlier calls (the last `remembered` of them). Rows are indexed when they draft,
    so decoding that drafts nothing pays only for appending tokens."""

    def __init__(self, longest: int = 4, shortest: int = 2, remembered: int = 256,
                 draft_lengths: tuple[int, ...] = DRAFT_LENGTHS):
        self.lengths = range(longest, shortest - 1, -1)
        self.lengths_to_try = draft_lengths
        self.history: deque[list[int]] = deque(maxlen=remembered)
        self.rows: list[list[int]] = []
        self.draft_lengths: dict[tuple, DraftLength] = {}  # per shape of call: rows, longest completion, greedy or not

    def length_for(self, shape: tuple) -> DraftLength:
        return self.draft_lengths.setdefault(shape, DraftLength(self.lengths_to_try))

    def start(self, prompts: list[list[int]], group_of_row: np.ndarray) -> None:
        """A new call: each row's text so far is its prompt; rows of one group share theirs."""
        self.rows = [list(p) for p in prompts]
        self.indexed = [0] * len(prompts)
        self.own = [NgramIndex(self.lengths) for _ in prompts]
        groups = {int(g): NgramIndex(self.lengths) for g in set(group_of_row.tolist())}
        self.group = [groups[int(g)] for g in group_of_row]
        self.everything = NgramIndex(self.lengths)
        for tokens in self.history:
            self.everything.add(tokens)

    def extend(self, row: int, tokens: list[int]) -> None:
        self.rows[row].extend(tokens)

    def draft(self, row: int, count: int) -> list[int]:
        """Up to `count` tokens that may follow row `row`'s text."""
        text = self.rows[row]
        for index in (self.own[row], self.group[row], self.everything):
            index.add(text, self.indexed[row])
        self.indexed[row] = len(text)  # the n-gram ending there has a token after it only from now on
        for n in self.lengths:
            if len(text) < n:
                continue
            suffix = tuple(text[-n:])
            for index in (self.own[row], self.group[row], self.everything):
                found = index.continuation(suffix, count)
                if found:
                    return found
        return []

    def finish(self, completions: list[list[int]]) -> None:
        """Remember this call's completions for the next calls."""
        self.history.extend(list(c) for c in completions if c)


def position_uniforms(rows: int, max_new_tokens: int, seed: int | None) -> np.ndarray:
    """(rows, max_new_tokens) uniform numbers, one per output position of each row: both backends draw
    the token at a position with its number, so given the same weights and seed they sample the same
    tokens, with or without drafts."""
    return np.random.default_rng(seed).random((rows, max_new_tokens), dtype=np.float32)


def decode(first: np.ndarray, run: Callable, commit: Callable, keep: Callable, max_new_tokens: int,
           stop_ids: set[int], pad_id: int, drafter: NgramDrafter | None = None, stats: dict | None = None
           ) -> list[list[int]]:
    """The decoding loop both backends share, with speculative decoding when given a `drafter`.

    `first` (rows,) are the tokens drawn after each row's prompt. The backend's model is reached
    through three calls: run(ids (B, T), positions (B, T), rows (B,)) runs the ids after each of
    `rows`' tokens so far and returns (B, T) tokens drawn after each, the one at output position p
    of a row with that position's own random number (so a drafted token is kept exactly when it is
    what plain decoding draws there); commit(counts (B,)) keeps that many of the ids each row ran;
    keep(indices) goes on with those rows of the batch only. `stats` receives the counts of forwards,
    of rows run in them, of drafted and of accepted tokens.
    """
    output = np.full((len(first), max_new_tokens), pad_id, dtype=np.int64)
    written = np.zeros(len(first), dtype=np.int64)  # tokens in each row's output so far
    active = np.arange(len(first))  # the rows the model holds
    done = np.zeros(len(first), dtype=bool)  # of those, the finished ones (fed padding until dropped)
    stops = np.array(sorted(stop_ids), dtype=np.int64)
    counts = {"forwards": 0, "row_forwards": 0, "drafted": 0, "accepted": 0}
    lengths = drafter.length_for((len(first), max_new_tokens)) if drafter is not None else None
    length, began = lengths.choose() if lengths else 0, time.perf_counter()

    def append(rows: np.ndarray, tokens: list) -> None:
        for row, row_tokens in zip(rows, tokens):
            output[row, written[row]:written[row] + len(row_tokens)] = row_tokens
            written[row] += len(row_tokens)
            if drafter is not None:
                drafter.extend(row, list(row_tokens))

    pending = np.asarray(first)  # drawn, not yet run through the model
    while True:
        append(active[~done], pending[~done, None])
        done |= np.isin(pending, stops) | (written[active] >= max_new_tokens)
        if done.all():
            break
        if done.sum() * 4 >= len(active):  # finished rows cost as much as live ones: drop them at a quarter
            kept_rows = np.flatnonzero(~done)
            keep(kept_rows)
            active, pending, done = active[kept_rows], pending[kept_rows], done[kept_rows]
        room = np.where(done, 0, max_new_tokens - written[active] - 1)  # a kept draft adds one more token
        drafts = draft_table(drafter, active, length, room, stop_ids)
        fed = np.concatenate([np.where(done, pad_id, pending)[:, None], np.where(drafts == NO_DRAFT, pad_id, drafts)],
                             axis=1)
        positions = np.minimum(written[active][:, None] + np.arange(fed.shape[1]), max_new_tokens - 1)
        drawn = run(fed, positions, active)
        kept = accepted_drafts(drawn, drafts)
        commit(kept + 1)  # the pending token and the accepted drafts
        append(active[~done], [d[:k] for d, k in zip(drafts[~done], kept[~done])])
        live, accepted = int((~done).sum()), int(kept.sum())
        pending = drawn[np.arange(len(active)), kept]
        done |= np.array([k > 0 and d[k - 1] in stop_ids for d, k in zip(drafts, kept)], dtype=bool)
        for name, count in (("forwards", 1), ("row_forwards", live), ("drafted", int((drafts != NO_DRAFT).sum())),
                            ("accepted", accepted)):
            counts[name] += count
    completions = [row[:count] for row, count in zip(output.tolist(), written)]
    if drafter is not None:
        drafter.finish(completions)
        lengths.record(length, int(written.sum()), time.perf_counter() - began)
    if stats is not None:
        stats.update(counts)
    return completions


def draft_table(drafter: NgramDrafter | None, rows: np.ndarray, length: int, room: np.ndarray,
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
