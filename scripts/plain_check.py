"""Score a checkpoint on a JSONL task's test lines with plain transformers (+ peft for an adapter) and none
of this project's code: the independent check of docs/tasks.md.

    python scripts/plain_check.py output/reasoning_final examples/multiplication.jsonl [--split test]

Greedy, the checkpoint's own chat template; correct when what follows </think> equals the line's answer
(numbers as numbers), in format when the completion is one <think> block followed by an answer.
"""
import argparse
import json
import math
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FORMAT = re.compile(r"^\s*<think>\n(?:(?!<think>|</think>).)*?\n</think>\n\S.*$", re.DOTALL)


def same_answer(given: str, reference) -> bool:
    try:
        return math.isclose(float(given.replace(",", "")), float(reference), rel_tol=1e-9)
    except ValueError:
        return given.strip() == str(reference).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("task", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    lines = [json.loads(line) for line in args.task.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if line.get("split") == args.split]
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, padding_side="left")
    if (args.checkpoint / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(args.checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    model.eval()
    correct = formatted = 0
    for start in range(0, len(lines), 16):
        batch = lines[start:start + 16]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": line["prompt"]}], tokenize=False,
                                               add_generation_prompt=True) for line in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        for line, row in zip(batch, output[:, inputs["input_ids"].shape[1]:]):
            completion = tokenizer.decode(row, skip_special_tokens=True)
            answer = completion.rpartition("</think>")[2].strip() if "</think>" in completion else None
            correct += answer is not None and same_answer(answer, line["answer"])
            formatted += bool(FORMAT.match(completion))
    print(f"{args.checkpoint} on {len(lines)} {args.split} lines of {args.task}: "
          f"correct {correct / len(lines):.1%}, in format {formatted / len(lines):.1%}")


if __name__ == "__main__":
    main()
