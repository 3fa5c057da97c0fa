"""Addition problems, their prompts and the reasoning trace the model learns to write."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from shared.runtime.errors import UsageError, UserError
from shared.tasks.task import HELD_OUT_EVERY, held_out_by_hash

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
# Problem shapes for evaluation: training uses the first; the others test generalisation.
EVAL_SETS = {
    "in_distribution": {"num_operands": 3, "low": 1, "high": 99},
    "two_operands": {"num_operands": 2, "low": 1, "high": 99},
    "four_operands": {"num_operands": 4, "low": 1, "high": 99},
    "three_digit": {"num_operands": 3, "low": 100, "high": 999},
}


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]

    @property
    def answer(self) -> int:
        return sum(self.operands)

    @property
    def prompt(self) -> str:
        return "Calculate " + " + ".join(map(str, self.operands))

    @property
    def completion(self) -> str:
        return reasoning_target(self)

    def fields(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "operands": list(self.operands)}

    def where(self) -> str:
        return f"problem {self.prompt!r}"


def is_held_out(problem: Problem) -> bool:
    """Stable split by content, so no run ever trains on a problem any run evaluates on."""
    return held_out_by_hash(problem.prompt)


def listing(numbers: tuple[int, ...]) -> str:
    """'23, 15, and 8' (or '23 and 15' for two)."""
    words = [str(n) for n in numbers]
    if len(words) == 2:
        return f"{words[0]} and {words[1]}"
    return ", ".join(words[:-1]) + ", and " + words[-1]


def reasoning_steps(operands: tuple[int, ...]) -> list[str]:
    """The numbered steps: running sums, then the verification line."""
    steps, total = [], operands[0]
    for index, operand in enumerate(operands[1:], start=1):
        label = "the first two" if index == 1 else f"the {ORDINALS[index]}"
        steps.append(f"Adding {label}: {total} + {operand} = {total + operand}")
        total += operand
    steps.append(f"Verification: {' + '.join(map(str, operands))} is indeed {total}.")
    return [f"{number}. {step}" for number, step in enumerate(steps, start=1)]


def reasoning_target(problem: Problem) -> str:
    """The SFT target, exactly the seed's Example Output format."""
    lines = [f"I need to calculate the sum of {listing(problem.operands)}.", *reasoning_steps(problem.operands)]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n" + str(problem.answer)


def most_problems(held_out: bool, num_operands: int = 3, low: int = 1, high: int = 99) -> int:
    """The most problems generate_problems draws from one side of the split: half of its expected size,
    so that drawing without repeats stays quick."""
    space = (high - low + 1) ** num_operands
    expected = space / HELD_OUT_EVERY if held_out else space * (1 - 1 / HELD_OUT_EVERY)
    return int(expected * 0.5)


def check_problem_count(flag: str, count: int, held_out: bool, shapes: tuple[str, ...] = ("in_distribution",)
                        ) -> None:
    """A count flag against the problem sets it draws from: a one-line error naming the largest that works."""
    limit, shape = min((most_problems(held_out, **EVAL_SETS[name]), name) for name in shapes)
    if count > limit:
        split = "held-out" if held_out else "training"
        what = "" if shape == "in_distribution" else f" {shape.replace('_operands', '-operand').replace('_', '-')}"
        raise UsageError(f"{flag} {count} is more than the {split}{what} problems allow: at most {limit}")


def generate_problems(count: int, seed: int, *, held_out: bool, num_operands: int = 3,
                      low: int = 1, high: int = 99) -> list[Problem]:
    """`count` distinct problems from one side of the train/eval split, seeded."""
    limit = most_problems(held_out, num_operands, low, high)
    if count > limit:
        raise ValueError(f"asked for {count} problems; that split gives at most {limit}")
    rng = random.Random(f"{seed}-{num_operands}-{low}-{high}-{held_out}")
    problems, seen = [], set()
    while len(problems) < count:
        problem = Problem(tuple(rng.randint(low, high) for _ in range(num_operands)))
        if problem not in seen and is_held_out(problem) == held_out:
            seen.add(problem)
            problems.append(problem)
    return problems


OUT_OF_DISTRIBUTION = tuple(name for name in EVAL_SETS if name != "in_distribution")


def parse_problem(text: str) -> Problem:
    """'23 + 15 + 8' or 'Calculate 23 + 15 + 8' -> Problem; a one-line error otherwise."""
    text = re.sub(r"^\s*calculate\s+", "", text.strip(), flags=re.IGNORECASE)
    if not re.fullmatch(r"\d{1,30}( *\+ *\d{1,30})+", text, flags=re.ASCII):
        raise UserError("enter a sum of whole numbers (up to 30 digits each), like 23 + 15 + 8")
    return Problem(tuple(int(n) for n in text.split("+")))
