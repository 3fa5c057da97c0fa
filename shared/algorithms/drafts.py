"""The decoding loop both backends share, and its speculative decoding without a draft model: drafts
from n-gram lookup, the acceptance rule, and how many tokens to draft.

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
# Calls with more rows decode without drafts: on a 2-core CPU a batch of 32 or 128 rows keeps the cores
# busy, checking 5 tokens per row costs about 3x one, and drafting lost 5 to 30 % there (README, Performance).
MOST_ROWS = 8


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

    def add(self, tokens: list[int], start: int = 0, *others: "NgramIndex") -> None:
        """Index (here and in `others`) the n-grams of `tokens` (a list that may grow later) ending at
        `start`.. and followed by a token: a row's own last n tokens are not their own most recent
        occurrence."""
        tables = [self.ends, *(other.ends for other in others)]
        for end in range(max(start, 1), len(tokens)):
            for n in self.lengths:
                if end >= n:
                    key, found = tuple(tokens[end - n:end]), (tokens, end)
                    for table in tables:
                        table[key] = found

    def continuation(self, suffix: tuple[int, ...], count: int) -> list[int]:
        found = self.ends.get(suffix)
        return [] if found is None else found[0][found[1]:found[1] + count]


class DraftLength:
    """How many tokens to draft per forward, learnt while decoding. Steps use the best length found so
    far (at first 0: plain decoding), except in windows of `window` steps that alternate between the
    best and a neighbour; the neighbour becomes the best if its steps made more tokens per second
    (neighbouring steps run about as many rows, so the comparison is fair). After a win the next
    window starts at once, climbing on; after a loss it waits `every` windows and looks the other way.
    So drafting turns itself off where it loses (on a CPU, large batches are matmul-bound and gain
    little from verifying several tokens at once) at the cost of a few steps at a neighbour's length."""

    def __init__(self, lengths: tuple[int, ...] = DRAFT_LENGTHS, window: int = 16, every: int = 8):
        self.lengths, self.window, self.every = lengths, window, every
        self.best, self.direction, self.steps, self.window_start = 0, 1, 0, 0
        self.measured: dict[int, list[float]] = {}  # in the current window: length -> [tokens, seconds]

    def neighbour(self) -> int:
        for index in (self.best + self.direction, self.best - self.direction):
            if 0 <= index < len(self.lengths):
                return index
        return self.best

    def choose(self) -> int:
        offset = self.steps - self.window_start
        self.steps += 1
        in_window = 0 <= offset < self.window
        return self.lengths[self.neighbour() if in_window and offset % 2 else self.best]

    def record(self, length: int, tokens: int, seconds: float) -> None:
        """What the step just chosen made: `tokens` in `seconds`."""
        if not 0 < self.steps - self.window_start <= self.window:
            return
        totals = self.measured.setdefault(length, [0.0, 0.0])
        totals[0] += tokens
        totals[1] += seconds
        if self.steps - self.window_start == self.window:
            speed = {k: t / max(s, 1e-9) for k, (t, s) in self.measured.items()}
            challenger = self.neighbour()
            won = speed.get(self.lengths[challenger], 0.0) > speed.get(self.lengths[self.best], float("inf"))
            if won:
                self.best, self.direction = challenger, challenger - self.best
            else:
                self.direction = -self.direction
            self.window_start = self.steps + (0 if won else self.window * self.every)
            self.measured = {}


class NgramDrafter:
    """Drafts for the rows of a generate call, from the rows themselves, their groups, and the
    completions of earlier calls (the last `remembered` of them). Rows are indexed when they draft,
    so decoding that drafts nothing pays only for appending tokens."""

    def __init__(self, longest: int = 4, shortest: int = 2, remembered: int = 256,
                 draft_lengths: tuple[int, ...] = DRAFT_LENGTHS, most_rows: int = MOST_ROWS):
        self.lengths = range(longest, shortest - 1, -1)
        self.lengths_to_try, self.most_rows = draft_lengths, most_rows
        self.history: deque[list[int]] = deque(maxlen=remembered)
        self.history_index, self.since_rebuilt = NgramIndex(self.lengths), 0
        self.rows: list[list[int]] = []
        self.draft_lengths: dict[tuple, DraftLength] = {}  # per shape of call: rows, longest completion

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
        self.everything.ends = dict(self.history_index.ends)

    def extend(self, row: int, tokens: list[int]) -> None:
        self.rows[row].extend(tokens)

    def draft(self, row: int, count: int) -> list[int]:
        """Up to `count` tokens that may follow row `row`'s text."""
        text = self.rows[row]
        self.own[row].add(text, self.indexed[row], self.group[row], self.everything)
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
        """Remember this call's completions for the next calls (their index rebuilt now and then, to
        forget the completions the history no longer holds)."""
        completions = [list(c) for c in completions if c]
        self.history.extend(completions)
        self.since_rebuilt += len(completions)
        if self.since_rebuilt > 4 * (self.history.maxlen or 1):
            self.history_index, self.since_rebuilt, completions = NgramIndex(self.lengths), 0, list(self.history)
        for tokens in completions:
            self.history_index.add(tokens)


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

    def append(rows: np.ndarray, tokens: list) -> None:
        for row, row_tokens in zip(rows, tokens):
            output[row, written[row]:written[row] + len(row_tokens)] = row_tokens
            written[row] += len(row_tokens)
            if drafter is not None:
                drafter.extend(row, list(row_tokens))

    def append_one(rows: np.ndarray, tokens: np.ndarray) -> None:
        output[rows, written[rows]] = tokens
        written[rows] += 1
        if drafter is not None:
            for row, token in zip(rows.tolist(), tokens.tolist()):
                drafter.extend(row, [token])

    pending = np.asarray(first)  # drawn, not yet run through the model
    while True:
        append_one(active[~done], pending[~done])
        done |= np.isin(pending, stops) | (written[active] >= max_new_tokens)
        if done.all():
            break
        if done.sum() * 4 >= len(active):  # finished rows cost as much as live ones: drop them at a quarter
            kept_rows = np.flatnonzero(~done)
            keep(kept_rows)
            active, pending, done = active[kept_rows], pending[kept_rows], done[kept_rows]
        began, length = time.perf_counter(), lengths.choose() if lengths else 0
        room = np.where(done, 0, max_new_tokens - written[active] - 1)  # a kept draft adds one more token
        drafts = draft_table(drafter, active, length, room, stop_ids) if length else \
            np.zeros((len(active), 0), dtype=np.int64)
        fed = np.concatenate([np.where(done, pad_id, pending)[:, None], np.where(drafts == NO_DRAFT, pad_id, drafts)],
                             axis=1)
        positions = np.minimum(written[active][:, None] + np.arange(fed.shape[1]), max_new_tokens - 1)
        drawn = run(fed, positions, active)
        kept = accepted_drafts(drawn, drafts)
        commit(kept + 1)  # the pending token and the accepted drafts
        live, accepted = int((~done).sum()), int(kept.sum())
        if accepted:
            append(active[~done], [d[:k] for d, k in zip(drafts[~done], kept[~done])])
        pending = drawn[np.arange(len(active)), kept]
        if accepted:  # a row whose last kept draft is a stop token is done
            done |= np.array([k > 0 and d[k - 1] in stop_ids for d, k in zip(drafts, kept)], dtype=bool)
        if lengths:
            lengths.record(length, live + accepted, time.perf_counter() - began)
        for name, count in (("forwards", 1), ("row_forwards", live), ("drafted", int((drafts != NO_DRAFT).sum())),
                            ("accepted", accepted)):
            counts[name] += count
    completions = [row[:count] for row, count in zip(output.tolist(), written)]
    if drafter is not None:
        drafter.finish(completions)
    if stats is not None:
        stats.update(counts)
    return completions


def draft_table(drafter: NgramDrafter, rows: np.ndarray, length: int, room: np.ndarray,
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
