"""Writes multiplication.jsonl, the example task of docs/tasks.md: a two-digit number times a one-digit one.

Each line has the fields the task file format reads (prompt, answer, completion, split) and two of its own,
`a` and `b`, which the example reward file (rewards.py) reads. Run: python examples/make_multiplication.py
"""
import json
import random
from pathlib import Path


def line(a: int, b: int, split: str, with_completion: bool = True) -> dict:
    tens, units = a - a % 10, a % 10
    if a >= 100:
        tens, units = a - a % 100, a % 100
    steps = f"{a} × {b} = {tens} × {b} + {units} × {b}\n= {tens * b} + {units * b}\n= {a * b}"
    trace = f"<think>\n{steps}\n</think>\n{a * b}"
    item = {"prompt": f"What is {a} times {b}?", "answer": a * b, "split": split, "a": a, "b": b}
    if with_completion:
        item["completion"] = trace
    return item


def main() -> None:
    pairs = [(a, b) for a in range(10, 100) for b in range(2, 10)]
    random.Random(0).shuffle(pairs)
    lines = [line(a, b, "test") for a, b in pairs[:72]]
    lines += [line(a, b, "train", with_completion=index < 600) for index, (a, b) in enumerate(pairs[72:])]
    rng = random.Random(1)
    lines += [line(rng.randint(100, 999), rng.randint(2, 9), "three_digit") for _ in range(50)]
    path = Path(__file__).with_name("multiplication.jsonl")
    path.write_text("".join(json.dumps(item) + "\n" for item in lines))
    print(f"wrote {len(lines)} lines to {path}")


if __name__ == "__main__":
    main()
