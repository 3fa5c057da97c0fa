"""A task from a JSONL file, one problem per line: `prompt` and `answer` (required), `completion` (the SFT
target; lines without one serve GRPO only) and `split` (train, test, or another name: an extra
evaluation set; without one, a hash of the prompt holds out one line in twenty)."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from shared.runtime.errors import UsageError, UserError
from shared.tasks.task import Reward, final_answer, held_out_by_hash, think_and_answer

FIELD_TYPES = {"prompt": (str,), "answer": (str, int, float), "completion": (str,), "split": (str,)}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str | int | float | None
    completion: str | None = None
    split: str = "test"
    line: int = 0
    path: str = ""
    data: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def fields(self) -> dict:
        return dict(self.data)

    def where(self) -> str:
        return f"line {self.line} of {self.path}" if self.line else f"prompt {self.prompt!r}"


def read_examples(path: Path) -> list[Example]:
    """The file's lines as examples; a UsageError naming the line and the field for the first bad one."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some Windows editors write, is skipped
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--task {path} cannot be read: {error}") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"--task {path} line {number} is not JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--task {path} line {number} is not a JSON object with prompt and answer")
        for name, types in FIELD_TYPES.items():
            required = name in ("prompt", "answer")
            if name not in data and required:
                raise UsageError(f"--task {path} line {number} has no {name!r}")
            value = data.get(name)
            if (value is not None or required) and (not isinstance(value, types) or isinstance(value, bool)):
                kinds = " or ".join("string" if t is str else "number" for t in types if t is not float)
                raise UsageError(f"--task {path} line {number}: {name!r} must be a {kinds}, got {value!r:.40}")
        if not data["prompt"].strip():
            raise UsageError(f"--task {path} line {number}: 'prompt' is empty")
        split = data.get("split") or ("test" if held_out_by_hash(data["prompt"]) else "train")
        examples.append(Example(data["prompt"], data["answer"], data.get("completion"), split, number, str(path), data))
    if not examples:
        raise UsageError(f"--task {path} is empty: it needs one JSON object per line, with prompt and answer")
    return examples


def as_number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        number = float(str(value).strip().replace(",", ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def answers_match(given: str, reference) -> bool:
    """Numbers compare as numbers (42 = 42.0 = "42"), anything else as text with the ends trimmed."""
    given_number, reference_number = as_number(given), as_number(reference)
    if given_number is not None and reference_number is not None:
        return math.isclose(given_number, reference_number, rel_tol=1e-9, abs_tol=1e-12)
    return given.strip() == str(reference).strip()


def correctness_reward(completion: str, example: Example) -> float:
    """1 when what follows `</think>` equals the line's answer, else 0."""
    answer = final_answer(completion)
    return float(answer is not None and example.answer is not None and answers_match(answer, example.answer))


def format_reward(completion: str, example: Example) -> float:
    """1 for one `<think>` block followed by an answer, else 0."""
    parts = think_and_answer(completion)
    return float(parts is not None and bool(parts[1]))


class FileTask:
    typing_hint = "Type a prompt (quit or Ctrl-D to stop)."

    def __init__(self, name: str):
        self.name = name
        self.path = Path(name)
        self.rewards = {"correctness": Reward(correctness_reward, 1.0), "format": Reward(format_reward, 0.2)}
        examples = read_examples(self.path)
        self.splits: dict[str, list[Example]] = {}
        for example in examples:
            self.splits.setdefault(example.split, []).append(example)
        self.extra_sets = tuple(name for name in self.splits if name not in ("train", "test"))
        if not self.splits.get("train"):
            raise UsageError(f"--task {name} has no training lines (split \"train\", or no split)")
        if not self.splits.get("test"):
            raise UsageError(f"--task {name} has no held-out lines: give some lines \"split\": \"test\"")
        # tokens enough for the longest completion, at ~2 characters per token (numbers and code come close)
        self.completion_tokens = max((len(e.completion or "") for e in examples), default=0) // 2 + 32

    def training_lines(self, for_sft: bool) -> list[Example]:
        return [e for e in self.splits["train"] if e.completion or not for_sft]

    def training_problems(self, count: int, seed: int, for_sft: bool) -> list[Example]:
        lines = self.training_lines(for_sft)
        random.Random(f"{seed}-{self.path.name}").shuffle(lines)
        return lines[:count]

    def held_out(self, count: int, seed: int) -> list[Example]:
        return self.splits["test"][:count]

    def extra_set(self, name: str, count: int, seed: int) -> list[Example]:
        return self.splits[name][:count]

    def check_count(self, flag: str, count: int, kind: str) -> None:
        if kind not in ("sft", "grpo"):
            return  # evaluations take the file's lines, as many as it has up to the count
        limit = len(self.training_lines(for_sft=kind == "sft"))
        if kind == "sft" and not limit:
            raise UsageError(f"{self.name} has no training line with a completion, which SFT learns from: add "
                             "some, or train --mode grpo from a checkpoint")
        if count > limit:
            what = "training lines with a completion" if kind == "sft" else "training lines"
            raise UsageError(f"{flag} {count} is more than {self.name} has: {limit} {what}")

    def typed_problem(self, text: str) -> Example:
        if not text.strip():
            raise UserError("type a prompt")
        return Example(text.strip(), None)

    def demo_problems(self) -> list[Example]:
        return self.splits["test"][:3]
