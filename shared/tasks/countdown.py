"""Countdown, TinyZero's task: reach a target from 3 or 4 numbers with + - * /, each number used once.

Problems are drawn with a target their numbers can reach; a small exact solver writes the SFT trace
(one line per operation, a verification line, then the expression) and a safe evaluator (no `eval`)
judges the answers.
"""
from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from shared.runtime.errors import UsageError, UserError
from shared.tasks.task import Reward, final_answer, held_out_by_hash, think_and_answer

NUMBER_RANGE = (1, 25)
TARGET_RANGE = (1, 100)
MOST_HELD_OUT, MOST_TRAINING = 10_000, 200_000  # far below the problems that exist, so drawing stays quick
EXPRESSION = re.compile(r"^[\d\s+\-*/()]{1,200}$", re.ASCII)
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class CountdownProblem:
    numbers: tuple[int, ...]
    target: int
    solution: tuple[str, ...] = ()  # the solver's operations, "7 - 5 = 2", ...; empty for a typed problem
    expression: str = ""  # the solver's answer

    @property
    def prompt(self) -> str:
        return (f"Using the numbers {listing(self.numbers)}, make {self.target}. "
                "Use + - * / and each number exactly once.")

    @property
    def answer(self) -> int:
        return self.target

    @property
    def completion(self) -> str | None:
        if not self.solution:
            return None
        steps = [f"{index}. {step}" for index, step in enumerate(self.solution, start=1)]
        lines = [f"I need to reach {self.target} with {listing(self.numbers)}, each once.", *steps,
                 f"Verification: {self.expression} = {self.target}."]
        return "<think>\n" + "\n".join(lines) + "\n</think>\n" + self.expression

    def fields(self) -> dict:
        return {"prompt": self.prompt, "answer": self.target, "numbers": list(self.numbers), "target": self.target}

    def where(self) -> str:
        return f"problem {self.prompt!r}"


def listing(numbers: tuple[int, ...]) -> str:
    """'3, 5, 7 and 2'."""
    return ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"


def reachable(numbers: tuple[int, ...]) -> dict[int, tuple[tuple[str, ...], str]]:
    """Every positive whole number the numbers make, each used once, with the first solution found
    (its operations and expression). Intermediate results stay positive whole numbers."""
    found: dict[int, tuple[tuple[str, ...], str]] = {}

    def search(items: list[tuple[int, str]], steps: tuple[str, ...]) -> None:
        if len(items) == 1:
            value, expression = items[0]
            found.setdefault(value, (steps, expression[1:-1] if steps else expression))
            return
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (a, left), (b, right) = sorted((items[i], items[j]), key=lambda item: -item[0])
                rest = [item for k, item in enumerate(items) if k not in (i, j)]
                for sign, value in (("+", a + b), ("-", a - b), ("*", a * b), ("/", a // b if a % b == 0 else 0)):
                    if value > 0:
                        step = f"{a} {sign} {b} = {value}"
                        search(rest + [(value, f"({left} {sign} {right})")], steps + (step,))

    search([(n, str(n)) for n in numbers], ())
    return found


def solve(numbers: tuple[int, ...], target: int) -> tuple[tuple[str, ...], str] | None:
    """The solver's operations and expression for reaching `target`, or None when it cannot be reached."""
    return reachable(numbers).get(target)


def is_held_out(numbers: tuple[int, ...]) -> bool:
    """Split by the set of numbers, so no held-out set of numbers is ever trained on, whatever its target."""
    return held_out_by_hash("countdown " + " ".join(map(str, sorted(numbers))))


def generate_countdown(count: int, seed: int, held_out: bool) -> list[CountdownProblem]:
    """`count` distinct problems from one side of the split, seeded: 3 or 4 numbers, a reachable target."""
    rng = random.Random(f"countdown-{seed}-{held_out}")
    problems, seen = [], set()
    while len(problems) < count:
        numbers = tuple(rng.randint(*NUMBER_RANGE) for _ in range(rng.choice((3, 4))))
        if is_held_out(numbers) != held_out:
            continue
        solutions = reachable(numbers)
        targets = [t for t in range(TARGET_RANGE[0], TARGET_RANGE[1] + 1) if t in solutions and t not in numbers]
        if not targets:
            continue
        target = rng.choice(targets)
        if (numbers, target) in seen:
            continue
        seen.add((numbers, target))
        steps, expression = solutions[target]
        problems.append(CountdownProblem(numbers, target, steps, expression))
    return problems


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """The value of an arithmetic expression of whole numbers with + - * / and parentheses, and the numbers
    it uses; None when it is anything else (a name, a call, a power, division by zero). Never `eval`."""
    if not EXPRESSION.match(text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            # ZeroDivisionError: not an expression that has a value
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not arithmetic")

    try:
        return value(tree), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def answer_expression(completion: str) -> str:
    """The expression after `</think>`; "expression = target" counts as the expression."""
    return (final_answer(completion) or "").split("=")[0].strip()


def valid_expression_reward(completion: str, problem: CountdownProblem) -> float:
    """1 when the answer is an arithmetic expression of whole numbers with + - * / and parentheses, else 0."""
    return float(evaluate_expression(answer_expression(completion)) is not None)


def numbers_once_reward(completion: str, problem: CountdownProblem) -> float:
    """1 when the answer uses exactly the given numbers, each once, else 0."""
    evaluated = evaluate_expression(answer_expression(completion))
    return float(evaluated is not None and Counter(evaluated[1]) == Counter(problem.numbers))


def correctness_reward(completion: str, problem: CountdownProblem) -> float:
    """1 when the answer uses each number once and reaches the target, else 0."""
    evaluated = evaluate_expression(answer_expression(completion))
    return float(evaluated is not None and Counter(evaluated[1]) == Counter(problem.numbers)
                 and evaluated[0] == problem.target)


def format_reward(completion: str, problem: CountdownProblem) -> float:
    """1 for one `<think>` block followed by a single line, else 0."""
    parts = think_and_answer(completion)
    return float(parts is not None and bool(parts[1]) and "\n" not in parts[1])


COUNTDOWN_REWARDS = {
    "correctness": Reward(correctness_reward, 1.0),
    "format": Reward(format_reward, 0.2),
    "valid_expression": Reward(valid_expression_reward, 0.1),
    "numbers_once": Reward(numbers_once_reward, 0.2),
}


class CountdownTask:
    typing_hint = "Type the numbers, then the target: 3 5 7 2 24 (quit or Ctrl-D to stop)."
    extra_sets: tuple[str, ...] = ()
    completion_tokens = 0

    def __init__(self, name: str = "countdown"):
        self.name = name
        self.rewards = dict(COUNTDOWN_REWARDS)

    def training_problems(self, count: int, seed: int, for_sft: bool) -> list[CountdownProblem]:
        return generate_countdown(count, seed, held_out=False)

    def held_out(self, count: int, seed: int) -> list[CountdownProblem]:
        return generate_countdown(count, seed, held_out=True)

    def extra_set(self, name: str, count: int, seed: int) -> list[CountdownProblem]:
        raise KeyError(name)

    def check_count(self, flag: str, count: int, kind: str) -> None:
        held_out = kind in ("held_out", "extra")
        limit = MOST_HELD_OUT if held_out else MOST_TRAINING
        if count > limit:
            split = "held-out" if held_out else "training"
            raise UsageError(f"{flag} {count} is more than the {split} countdown problems allow: at most {limit}")

    def typed_problem(self, text: str) -> CountdownProblem:
        numbers = [int(n) for n in re.findall(r"\d{1,6}", text, flags=re.ASCII)]
        if not 3 <= len(numbers) <= 7:
            raise UserError("type 2 to 6 numbers, then the target, like 3 5 7 2 24")
        return CountdownProblem(tuple(numbers[:-1]), numbers[-1])

    def demo_problems(self) -> list[CountdownProblem]:
        return self.held_out(3, 7)
