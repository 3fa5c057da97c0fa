"""Which digits a checkpoint gets right: teacher-forced accuracy of each digit of each step's result.

    python bench/digit_accuracy.py CHECKPOINT [--problems 300]

Feeds the reference trace of held-out problems through plain transformers and counts, for each digit
of the two running sums, the verification and the answer, how often the model's most likely next token
is the right digit. It shows where a model on the SFT plateau stands: the tiny model there writes the
tens digit (carry included) and guesses the units digit (about 10 %, chance).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.tasks.addition.data import generate_problems, reasoning_target  # noqa: E402

PLACES = ("units", "tens", "hundreds")
NUMBERS = {
    "step 1 sum": r"first two: \d+ \+ \d+ = (\d+)",
    "step 2 sum": r"third: \d+ \+ \d+ = (\d+)",
    "verification": r"indeed (\d+)",
    "answer": r"</think>\n(\d+)",
}


def digit_roles(text: str) -> dict[int, str]:
    """Character offset -> 'step 1 sum: units' and the like, for the digits of each number in NUMBERS."""
    roles = {}
    for label, pattern in NUMBERS.items():
        match = re.search(pattern, text)
        if match:
            start, end = match.span(1)
            for offset in range(start, end):
                roles[offset] = f"{label}: {PLACES[end - 1 - offset]}"
    return roles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--problems", type=int, default=300)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    right, seen = Counter(), Counter()
    for problem in generate_problems(args.problems, 5, held_out=True):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        text = prompt + reasoning_target(problem)
        encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(input_ids=encoded["input_ids"]).logits[0].argmax(-1)
        ids, roles = encoded["input_ids"][0], digit_roles(text)
        for index, (start, end) in enumerate(encoded["offset_mapping"][0].tolist()):
            if index and end - start == 1 and start in roles:
                seen[roles[start]] += 1
                right[roles[start]] += int(predicted[index - 1] == ids[index])
    print("| digit | right | of |\n|---|---|---|")
    for role in sorted(seen, key=lambda r: (list(NUMBERS).index(r.split(":")[0]), r)):
        print(f"| {role} | {right[role] / seen[role]:.1%} | {seen[role]} |")


if __name__ == "__main__":
    main()
