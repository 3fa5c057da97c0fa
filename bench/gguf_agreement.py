"""Does the GGUF file answer as the checkpoint does? llama.cpp (llama-cpp-python) against plain transformers + peft.

    python bench/gguf_agreement.py CHECKPOINT [--problems 50] [--dtypes f16,q8_0] [--work DIR] [--json PATH]

CHECKPOINT is any checkpoint `train` writes (a PEFT or mlx-lm adapter, or a full folder). Each dtype is exported
with `convert --to gguf`; llama.cpp answers the held-out problems through the chat template stored in the file
(`create_chat_completion`, temperature 0), transformers through the tokenizer's chat template (`generate`, greedy;
an mlx-lm adapter is first converted to PEFT with `convert --to torch`, as a user would). Printed: per dtype, the
problems whose final answer equals transformers', whose whole completion does, accuracy, tokens/s, file size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.checkpoints.layouts import detect_layout  # noqa: E402
from shared.tasks.registry import load_task  # noqa: E402
from shared.tasks.task import final_answer, is_correct  # noqa: E402
from shared.training.config import TaskConfig  # noqa: E402

MAX_NEW_TOKENS = 256
SEED = 42  # the held-out problems `train` and `eval` score


def cli(*arguments) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, arguments)], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: cli.py {arguments[0]} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")


def peft_loadable(checkpoint: Path, work: Path) -> Path:
    if detect_layout(checkpoint) != "mlx_lora":
        return checkpoint
    folder = work / "as_peft"
    if not folder.exists():
        cli("convert", checkpoint, "--to", "torch", "--output", folder)
    return folder


def transformers_answers(checkpoint: Path, messages: list[list[dict]]) -> tuple[list[str], float]:
    """Greedy completions from plain transformers (+ peft for an adapter), batched with left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = (checkpoint / "adapter_config.json").exists()
    base = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] if adapter \
        else str(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(checkpoint))
    model.eval()
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    answers, tokens, began = [], 0, time.perf_counter()
    for start in range(0, len(texts), 25):
        batch = tokenizer(texts[start:start + 25], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id or stops[0])
        for row in out[:, batch["input_ids"].shape[1]:]:
            row = [t for t in row.tolist() if t not in stops]
            tokens += len(row)
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers, tokens / (time.perf_counter() - began)


def llama_cpp_answers(gguf_file: Path, messages: list[list[dict]]) -> tuple[list[str], float]:
    from llama_cpp import Llama

    llm = Llama(str(gguf_file), n_ctx=0, n_threads=os.cpu_count(), verbose=False, seed=0)  # the model's context
    answers, tokens, began = [], 0, time.perf_counter()
    for message in messages:
        reply = llm.create_chat_completion(messages=message, temperature=0.0, max_tokens=MAX_NEW_TOKENS)
        answers.append(reply["choices"][0]["message"]["content"] or "")
        tokens += reply["usage"]["completion_tokens"]
    return answers, tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--dtypes", default="f16,q8_0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_gguf_agreement"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("error: this bench needs llama.cpp's Python binding: pip install llama-cpp-python")
    args.work.mkdir(parents=True, exist_ok=True)
    task = load_task(TaskConfig())
    problems = task.held_out(args.problems, SEED)
    messages = [[{"role": "user", "content": p.prompt}] for p in problems]

    reference, reference_speed = transformers_answers(peft_loadable(args.checkpoint, args.work), messages)
    rows = [{"model": "transformers + peft (reference)", "same answer": len(problems),
             "same text": len(problems), "accuracy": sum(is_correct(task.rewards, c, p)
                                                         for c, p in zip(reference, problems)) / len(problems),
             "tokens/s": reference_speed, "MiB": None}]
    for dtype in args.dtypes.split(","):
        gguf_file = args.work / f"model-{dtype}.gguf"
        gguf_file.unlink(missing_ok=True)
        cli("convert", args.checkpoint, "--to", "gguf", "--dtype", dtype, "--output", gguf_file)
        answers, speed = llama_cpp_answers(gguf_file, messages)
        rows.append({"model": f"llama.cpp {dtype}",
                     "same answer": sum(final_answer(a) == final_answer(r) for a, r in zip(answers, reference)),
                     "same text": sum(a.strip() == r.strip() for a, r in zip(answers, reference)),
                     "accuracy": sum(is_correct(task.rewards, c, p) for c, p in zip(answers, problems)) / len(problems),
                     "tokens/s": speed, "MiB": gguf_file.stat().st_size / 2**20})
        for a, r, p in zip(answers, reference, problems):
            if final_answer(a) != final_answer(r):
                print(f"  {dtype} differs on {p.prompt!r}: llama.cpp {final_answer(a)!r}, transformers "
                      f"{final_answer(r)!r}", file=sys.stderr)
    print(f"{args.checkpoint} on {len(problems)} held-out problems (seed {SEED}), greedy\n")
    print("| model | same final answer as transformers | same completion | accuracy | tokens/s | file MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        size = f"{row['MiB']:.0f}" if row["MiB"] else "-"
        print(f"| {row['model']} | {row['same answer']}/{len(problems)} | {row['same text']}/{len(problems)} | "
              f"{100 * row['accuracy']:.1f}% | {row['tokens/s']:.0f} | {size} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
