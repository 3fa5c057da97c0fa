"""What a run learns, as one small interface: where its problems come from and how they split, the
SFT target, the rewards with their weights, and how an answer is judged. Addition is the default;
`countdown` and a JSONL file are the others, and a reward file adds rewards to any of them."""
from __future__ import annotations

import hashlib
import math
import numbers
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol

from shared.runtime.errors import UsageError, UserError

HELD_OUT_EVERY = 20  # one problem in 20 is held out for evaluation, for every task, run and seed
THINK_BLOCK = re.compile(r"^\s*<think>\n(?P<body>.*?)\n</think>\n(?P<answer>.*)$", re.DOTALL)
RewardFunction = Callable[[str, Any], float]  # (completion, problem) -> reward


class Reward(NamedTuple):
    function: RewardFunction
    weight: float


class TaskProblem(Protocol):
    """One problem of any task."""
    prompt: str  # the user message, sent through the model's chat template unchanged
    answer: Any  # the reference answer
    completion: str | None  # the SFT target: the <think> trace, then the answer; None: GRPO only

    def fields(self) -> dict:
        """What a reward file's function gets as `example`: the JSONL line, or a built-in problem's fields."""

    def where(self) -> str:
        """The problem in an error message: "line 12 of tasks.jsonl", "problem 'Calculate 1 + 2 + 3'"."""


class Task(Protocol):
    name: str  # 'addition', 'countdown', or the JSONL file's path
    rewards: dict[str, Reward]  # correctness is the accuracy; format is reported beside it
    extra_sets: tuple[str, ...]  # evaluation sets beyond the held-out one (out of distribution, a file's splits)
    typing_hint: str  # what `infer --interactive` asks for
    completion_tokens: int  # the longest completion its problems need (0: the preset's cap is enough)

    def training_problems(self, count: int, seed: int, for_sft: bool) -> list[TaskProblem]:
        """`count` training problems, seeded; for SFT, only those with a completion."""

    def held_out(self, count: int, seed: int) -> list[TaskProblem]:
        """Up to `count` held-out problems (a file gives as many as it has)."""

    def extra_set(self, name: str, count: int, seed: int) -> list[TaskProblem]:
        """Up to `count` problems of one of `extra_sets`."""

    def check_count(self, flag: str, count: int, kind: str) -> None:
        """A UsageError when `count` problems of `kind` (sft, grpo, held_out, extra) cannot be drawn."""

    def typed_problem(self, text: str) -> TaskProblem:
        """What a user typed, as a problem; a UserError saying what to type otherwise."""

    def demo_problems(self) -> list[TaskProblem]:
        """What `infer` shows without --batch or --interactive."""


@dataclass
class TaskConfig:
    name: str = "addition"  # a built-in task, or a JSONL file's path
    sha256: str | None = None  # of the JSONL file
    reward_file: str | None = None
    reward_file_sha256: str | None = None


def held_out_by_hash(text: str) -> bool:
    """The split every task uses: a stable hash of the text, so no run trains on what any run evaluates."""
    return zlib.crc32(text.encode()) % HELD_OUT_EVERY == 0


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def existing_file(name: str | Path, flag: str, expected: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag} {name}: no such file; expected {expected}")
    return path.resolve()


def reward_weights(rewards: dict[str, Reward]) -> dict[str, float]:
    return {name: reward.weight for name, reward in rewards.items()}


def reward_components(rewards: dict[str, Reward], completion: str, problem: TaskProblem) -> dict[str, float]:
    """Each reward of a completion; a reward that raises or returns no number stops with a line naming it."""
    components = {}
    for name, reward in rewards.items():
        try:
            value = reward.function(completion, problem)
        except Exception as error:  # the user's own code: any failure is theirs to see, in one line
            raise RewardFailed(f"reward {name!r} raised {type(error).__name__}: {error} on {problem.where()}") \
                from None
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # bool and numpy numbers count
            raise RewardFailed(f"reward {name!r} returned {value!r:.40}, not a finite number, on {problem.where()}")
        components[name] = float(value)
    return components


def is_correct(rewards: dict[str, Reward], completion: str, problem: TaskProblem) -> bool:
    return bool(reward_components({"correctness": rewards["correctness"]}, completion, problem)["correctness"])


def combined_reward(components: dict[str, float], weights: dict[str, float]) -> float:
    """The GRPO reward: the weighted sum of the components."""
    return sum(weight * components[name] for name, weight in weights.items())


def think_and_answer(completion: str) -> tuple[str, str] | None:
    """The body of exactly one leading `<think>` block and the answer after it (stripped); None for any other shape."""
    match = THINK_BLOCK.match(completion)
    if not match or "<think>" in match["body"] or "</think>" in match["body"]:
        return None
    return match["body"], match["answer"].strip()


def final_answer(completion: str) -> str | None:
    """What follows the last `</think>`, stripped; None without one."""
    _, marker, tail = completion.rpartition("</think>")
    return tail.strip() if marker else None


def typed_problems(lines: Iterable[str], task: Task) -> Iterator[TaskProblem | str]:
    """Problems typed one per line, until quit or exit: each a problem, or the error line for what is not one."""
    for line in lines:
        if line.strip().lower() in ("quit", "exit"):
            return
        try:
            yield task.typed_problem(line)
        except UserError as error:
            yield f"error: {error}"


class RewardFailed(UsageError):
    """A reward function raised or returned something other than a number."""
