"""The seed's task, the default: sums of three numbers from 1 to 99, with the steps written out."""
from __future__ import annotations

from shared.tasks.addition.data import (EVAL_SETS, OUT_OF_DISTRIBUTION, Problem, check_problem_count, generate_problems,
                                        parse_problem)
from shared.tasks.addition.rewards import ADDITION_REWARDS


class AdditionTask:
    typing_hint = "Type a sum like 23 + 15 + 8 (quit or Ctrl-D to stop)."
    extra_sets = OUT_OF_DISTRIBUTION
    completion_tokens = 0

    def __init__(self, name: str = "addition"):
        self.name = name
        self.rewards = dict(ADDITION_REWARDS)

    def training_problems(self, count: int, seed: int, for_sft: bool) -> list[Problem]:
        return generate_problems(count, seed, held_out=False)

    def held_out(self, count: int, seed: int) -> list[Problem]:
        return generate_problems(count, seed, held_out=True)

    def extra_set(self, name: str, count: int, seed: int) -> list[Problem]:
        return generate_problems(count, seed, held_out=True, **EVAL_SETS[name])

    def check_count(self, flag: str, count: int, kind: str) -> None:
        if kind == "extra":
            check_problem_count(flag, count, held_out=True, shapes=OUT_OF_DISTRIBUTION)
        else:
            check_problem_count(flag, count, held_out=kind == "held_out")

    def typed_problem(self, text: str) -> Problem:
        return parse_problem(text)

    def demo_problems(self) -> list[Problem]:
        return [Problem((23, 15, 8)), Problem((12, 15, 3)), Problem((11, 22, 8))]
