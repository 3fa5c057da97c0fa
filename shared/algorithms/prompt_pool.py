"""Which GRPO prompts teach: each prompt's pass rate remembered from its rollouts, and a draw that
favours prompts near a 50 % pass rate and never returns to one every sample solved.

The expected improvement from a prompt scales with p(1 - p) (Bae et al., arXiv 2504.03380); DAPO
drops groups whose samples all scored the same and refills the batch; Polaris drops prompts above
a 0.9 pass rate. The pool is the state behind that, kept with the run's resume points.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class PromptPool:
    """Attempts and correct answers per prompt of the GRPO set (indices into it)."""
    size: int
    attempts: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    groups_sampled: int = 0  # over the run, for how many to draw: groups sampled and those whose rewards differed
    groups_informative: int = 0

    def __post_init__(self):
        self.attempts = self.attempts or [0] * self.size
        self.correct = self.correct or [0] * self.size

    def record(self, index: int, correct: list[bool]) -> None:
        self.attempts[index] += len(correct)
        self.correct[index] += int(sum(correct))

    def count_groups(self, sampled: int, informative: int) -> None:
        self.groups_sampled += sampled
        self.groups_informative += informative

    def informative_share(self) -> float:
        """The share of groups so far whose rewards differed (1 before any; at least 0.1): how many prompts
        to draw for the groups a step still needs."""
        return max((self.groups_informative + 1) / (self.groups_sampled + 1), 0.1)

    def solved(self) -> np.ndarray:
        """Prompts every one of whose samples so far was right: nothing left to learn from them."""
        attempts = np.array(self.attempts)
        return (attempts > 0) & (np.array(self.correct) == attempts)

    def draw_weights(self) -> np.ndarray:
        """p(1 - p) of each prompt's pass rate with a uniform prior, (correct + 1) / (attempts + 2): an untried
        prompt weighs as much as one at 50 %, one never solved little, one always solved nothing."""
        rate = (np.array(self.correct) + 1) / (np.array(self.attempts) + 2)
        return np.where(self.solved(), 0.0, rate * (1 - rate))

    def draw(self, rng: np.random.Generator, count: int, exclude: set[int] = frozenset()) -> list[int]:
        """Up to `count` distinct prompts, each with probability in proportion to its weight; `exclude`
        (those already drawn this step) and the solved ones are left out, unless every prompt is solved."""
        weights = self.draw_weights()
        if not weights.any():  # the whole set solved once: its prompts may fail again as the policy moves
            weights[:] = 1.0
        weights[list(exclude)] = 0.0
        eligible = np.flatnonzero(weights)
        if len(eligible) <= count:
            return [int(i) for i in eligible]
        chosen = rng.choice(eligible, size=count, replace=False, p=weights[eligible] / weights[eligible].sum())
        return [int(i) for i in chosen]

    def summary(self) -> dict:
        """For the log: how much of the set has been tried, and how much of it is solved."""
        attempts = np.array(self.attempts)
        return {"prompts_tried": int((attempts > 0).sum()), "prompts_solved": int(self.solved().sum())}

    def to_dict(self) -> dict:
        return asdict(self)


def informative_groups(scores: np.ndarray) -> np.ndarray:
    """(groups, G) rewards -> the groups whose samples did not all score the same: only they have an advantage."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.flatnonzero(scores.max(axis=1) - scores.min(axis=1) > 1e-9)
