"""Example reward file for multiplication.jsonl: `python cli.py train --task examples/multiplication.jsonl
--reward-file examples/rewards.py`. Each function gets the completion and the task's JSONL line as a dict."""


def partial_products(completion: str, example: dict) -> float:
    """1 when the trace writes both partial products of a times b (e.g. 240 and 42 for 47 times 6), else 0."""
    a, b = example["a"], example["b"]
    split = 100 if a >= 100 else 10
    thinking = completion.split("</think>")[0]
    return float(str((a - a % split) * b) in thinking and str(a % split * b) in thinking)


REWARDS = {"partial_products": (partial_products, 0.2)}
