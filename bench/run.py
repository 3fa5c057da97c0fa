"""Ours vs the peers, side by side, same machine, same model, data, batch, lengths and group size.

    python bench/run.py [--quick] [--only GROUP ...] [--json PATH]

Each group is a module of bench/ that also runs alone (python bench/sft.py [--quick] [--json PATH]):
  tiny-sft           bench/sft.py: SFT tokens/s on the tiny model, ours vs TRL SFTTrainer (PyTorch) and vs
                     mlx_lm.lora (MLX), full fine-tuning and LoRA.
  tiny-grpo          bench/grpo.py: GRPO step time on the tiny model after 300 SFT steps, ours (PyTorch) vs
                     TRL GRPOTrainer, 16 prompts x G=8, 200 tokens.
  rollout            bench/rollout.py: rollout tokens/s, ours vs transformers `generate` and mlx_lm
                     `batch_generate`.
  qwen-architecture  bench/qwen_architecture.py: Qwen2.5-0.5B's architecture with random weights, LoRA SFT
                     and rollout tokens/s and peak memory, ours on each backend.
  smollm2            bench/smollm2.py: SmolLM2-135M-Instruct with LoRA, ours vs TRL and mlx-lm: SFT, GRPO
                     step, rollout; greedy answers one at a time with n-gram drafts vs without.
  time-to-accuracy   bench/time_to_accuracy.py: minutes to 90 % and 97 % held-out accuracy with the `make demo`
                     settings: PyTorch, stopping at 97 % with --quick; without it, to the end and MLX too.
  grpo-vs-trl        bench/grpo_vs_trl.py: GRPO against TRL's GRPOTrainer from one SmolLM2 SFT checkpoint at
                     equal minutes, paired on the same held-out problems (about an hour here).
  memory             bench/memory.py: peak memory of SmolLM2's SFT and GRPO steps against TRL's trainers and
                     mlx_lm.lora (about 30 minutes here, and 18 GB for TRL's GRPO step).
The last two are not in the default set. Prints a markdown table, each row as soon as it is measured; --json
writes rows {name, ours, peer, unit, ratio, goal, lower_is_better}, rewritten after each.
TRL and mlx-lm are benchmark-only dependencies (pip install -e '.[bench]').
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project's root

from bench.common import print_rows  # noqa: E402

GROUPS = {"tiny-sft": "sft", "tiny-grpo": "grpo", "rollout": "rollout", "qwen-architecture": "qwen_architecture",
          "smollm2": "smollm2", "time-to-accuracy": "time_to_accuracy", "grpo-vs-trl": "grpo_vs_trl",
          "memory": "memory"}
LONG_GROUPS = ("grpo-vs-trl", "memory")  # an hour, and TRL's GRPO step without checkpointing needs 18 GB


def group_rows(group: str, quick: bool, sft_checkpoint: Path | None):
    module = importlib.import_module(f"bench.{GROUPS[group]}")
    if group == "grpo-vs-trl":
        return module.rows(sft_checkpoint, eval_samples=200 if quick else 1000)
    return module.rows(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps per measurement, time-to-accuracy on PyTorch only, to 97 %%")
    parser.add_argument("--only", action="append", choices=list(GROUPS), metavar="GROUP",
                        help=f"measure this group only (repeatable): {', '.join(GROUPS)}")
    parser.add_argument("--json", type=Path, help="also write the rows here, rewritten after each one")
    parser.add_argument("--sft-checkpoint", type=Path, help="grpo-vs-trl: start both from this SmolLM2 SFT checkpoint")
    args = parser.parse_args()
    missing = [module for module in ("trl", "datasets", "torch", "mlx_lm") if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"error: bench/run.py needs {', '.join(missing)}: pip install -e '.[torch,mlx,bench]'")
    began = time.perf_counter()
    groups = args.only or [name for name in GROUPS if name not in LONG_GROUPS]
    print_rows((measured for group in groups for measured in group_rows(group, args.quick, args.sft_checkpoint)),
               args.json)
    print(f"\n{time.perf_counter() - began:.0f} s on this machine", file=sys.stderr)


if __name__ == "__main__":
    main()
