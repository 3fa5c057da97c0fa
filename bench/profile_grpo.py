"""Where a GRPO step's time goes (PyTorch): rollout, forward, backward, optimizer, everything else.

    python bench/profile_grpo.py POLICY [--preset smollm2] [--steps 3] [--per-row] [--no-drafts]

POLICY is a model folder (for example the bench's /tmp/bench_smollm2_sft_40, SmolLM2 after 40 SFT
steps). Runs `--steps` GRPO steps with the preset's settings after a warm-up step and prints the mean
seconds of each part per step. `--per-row` runs every completion with its own copy of its prompt (the
pass before shared-prefix training); `--no-drafts` samples without speculative decoding.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(table: dict, part: str, function):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            table[part] += time.perf_counter() - began
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", type=Path)
    parser.add_argument("--preset", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-row", action="store_true", help="no shared-prefix training")
    parser.add_argument("--no-drafts", action="store_true", help="no speculative decoding")
    args = parser.parse_args()

    import torch

    import reasoning_torch.backend as torch_backend
    from shared.tasks.addition.data import generate_problems
    from shared.tasks.addition.rewards import ADDITION_REWARDS
    from shared.training.config import build_run_config
    from shared.training.loops import train_grpo

    config = build_run_config({"model": {"name": args.preset}}, {})
    config.grpo.save_every = 0
    backend = torch_backend.TorchBackend(shared_prefix=not args.per_row, speculative=not args.no_drafts)
    backend.load(args.policy, config.model, trainable=True)
    seconds: dict[str, float] = defaultdict(float)
    backend.generate = timed(seconds, "rollout", backend.generate)
    backend.optimizer_step = timed(seconds, "optimizer", backend.optimizer_step)
    for name in ("prefix_logprobs", "token_logprobs"):
        setattr(torch_backend, name, timed(seconds, "forward", getattr(torch_backend, name)))
    torch.Tensor.backward = timed(seconds, "backward", torch.Tensor.backward)
    records = []
    problems = generate_problems(config.grpo.prompts_per_step * (args.steps + 1), seed=1, held_out=False)
    for step in train_grpo(backend, problems, config.grpo, 0, records.append, rewards=ADDITION_REWARDS):
        if step == 1:  # the warm-up step is not counted
            seconds.clear()
    total = sum(r["step_s"] for r in records[1:])
    parts = {**seconds, "everything else": total - sum(seconds.values())}
    print("| part | s/step | share |\n|---|---|---|")
    for part, value in parts.items():
        print(f"| {part} | {value / args.steps:.2f} | {value / total:.0%} |")
    print(f"| **step** | **{total / args.steps:.2f}** | |")
    print(f"mean completion {sum(r['completion_tokens'] for r in records[1:]) / args.steps:.0f} tokens; "
          f"rows with a gradient {sum(r['trained_sequences'] for r in records[1:]) / args.steps:.0f}", file=sys.stderr)


if __name__ == "__main__":
    main()
