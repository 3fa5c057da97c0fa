"""The addition task's reward functions: plain functions of (completion text, problem), and their weights."""
from __future__ import annotations

import re

from shared.tasks.addition.data import Problem
from shared.tasks.task import Reward

# Sampled text can hold any byte: ASCII classes keep \s and \d to what int() parses (not \x1f or other
# Unicode "spaces" and digits), and numbers are bounded, since int() refuses over 4300 digits.
NUMBER = r"(?<!\d)-?\d{1,30}(?!\d)"
THINK_BLOCK = re.compile(r"^\s*<think>\n(?P<body>.*?)\n</think>\n(?P<answer>.*)$", re.DOTALL | re.ASCII)
INTEGER = re.compile(r"^-?\d{1,30}$", re.ASCII)
NUMBERED_STEP = re.compile(r"^(\d{1,9})\. \S", re.MULTILINE | re.ASCII)
ADDITION = re.compile(rf"({NUMBER}(?:[ \t]*\+[ \t]*{NUMBER})+)[ \t]*=[ \t]*({NUMBER})", re.ASCII)
VERIFICATION = re.compile(rf"Verification: ({NUMBER}(?:[ \t]*\+[ \t]*{NUMBER})+) is indeed ({NUMBER})\.", re.ASCII)


def parse_answer(completion: str) -> int | None:
    """The integer after the last `</think>`; None when it is missing, not one integer, or junk."""
    _, marker, tail = completion.rpartition("</think>")
    tail = tail.strip()
    if not marker or not INTEGER.match(tail):
        return None
    return int(tail)


def correctness_reward(completion: str, problem: Problem) -> float:
    """1 when the final answer after </think> is exactly the sum, else 0."""
    return float(parse_answer(completion) == problem.answer)


def format_reward(completion: str, problem: Problem) -> float:
    """1 for exactly one `<think>\\n...\\n</think>\\n` block followed by a lone integer, else 0."""
    match = THINK_BLOCK.match(completion)
    if not match or "<think>" in match["body"] or "</think>" in match["body"]:
        return 0.0
    return float(bool(INTEGER.match(match["answer"].strip())))


def steps_reward(completion: str, problem: Problem) -> float:
    """Fraction of the expected numbered steps (one per addition, plus verification), in order, 0..1."""
    expected = len(problem.operands)
    numbers = [int(n) for n in NUMBERED_STEP.findall(think_body(completion))]
    in_order = 0
    for position, number in enumerate(numbers, start=1):
        if number != position:
            break
        in_order = position
    return in_order / expected if in_order <= expected else 0.0


def verification_reward(completion: str, problem: Problem) -> float:
    """1 when a 'Verification: <all operands> is indeed <sum>.' line restates the problem correctly."""
    for terms, result in VERIFICATION.findall(think_body(completion)):
        operands = tuple(int(t) for t in terms.split("+"))
        if operands == problem.operands and int(result) == problem.answer:
            return 1.0
    return 0.0


def step_validity_reward(completion: str, problem: Problem) -> float:
    """Fraction of `x + y = z` lines that are arithmetically right, times how many were expected (0..1).

    Pays nothing for well-formatted wrong arithmetic, and nothing for skipping the work.
    """
    equations = ADDITION.findall(think_body(completion))
    if not equations:
        return 0.0
    correct = sum(sum(int(t) for t in terms.split("+")) == int(total) for terms, total in equations)
    expected = len(problem.operands) - 1
    return (correct / len(equations)) * min(len(equations), expected) / expected


def think_body(completion: str) -> str:
    start, end = completion.find("<think>"), completion.find("</think>")
    if start < 0:
        return ""
    return completion[start + len("<think>"): end if end > start else len(completion)]


# correctness is weighted highest; the weighted sum is at most 1.6
ADDITION_REWARDS = {
    "correctness": Reward(correctness_reward, 1.0),
    "format": Reward(format_reward, 0.2),
    "steps": Reward(steps_reward, 0.1),
    "verification": Reward(verification_reward, 0.1),
    "step_validity": Reward(step_validity_reward, 0.2),
}
