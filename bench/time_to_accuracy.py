"""Time-to-accuracy of the `make demo` settings: minutes of training to reach 90 % and 97 % held-out.

    python bench/time_to_accuracy.py [--backend torch] [--eval-every 100] [--eval-problems 300] [--stop-at 0.97]

Trains SFT then GRPO with the tiny model's preset, evaluating greedily every N optimiser steps;
the clock counts training only (evaluation time is excluded). Prints a markdown table and the curve.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import build_run_config  # noqa: E402
from shared.data import generate_problems  # noqa: E402
from shared.evaluation import evaluate  # noqa: E402
from shared.rewards import ADDITION_REWARDS  # noqa: E402
from shared.pipeline import resolve_model  # noqa: E402
from shared.progress import setup_logging  # noqa: E402
from shared.training import train_grpo, train_sft  # noqa: E402
from backends import make_backend  # noqa: E402

TARGETS = (0.90, 0.97)


class TargetReached(Exception):
    """--stop-at was reached: the rest of the run would not change the times to the targets."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--eval-every", type=int, default=100, help="optimiser steps between evaluations")
    parser.add_argument("--eval-problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, help="also write the curve here")
    parser.add_argument("--stop-at", type=float, help="stop training once held-out accuracy reaches this (0.97)")
    args = parser.parse_args()
    setup_logging("WARNING")

    config = build_run_config({"model": {"name": "tiny"}}, {"seed": args.seed})
    config.eval.num_problems = args.eval_problems
    backend = make_backend(args.backend)
    backend.load(resolve_model("tiny"), config.model, trainable=True)
    held_out = generate_problems(args.eval_problems, args.seed, held_out=True)
    curve: list[dict] = []
    clock = {"training_s": 0.0, "since": time.perf_counter()}

    def after_step(phase: str, step: int, every: int) -> None:
        if step % every:
            return
        clock["training_s"] += time.perf_counter() - clock["since"]
        accuracy = evaluate(backend, ADDITION_REWARDS, held_out, config.eval, label="eval").accuracy
        curve.append({"phase": phase, "step": step, "minutes": clock["training_s"] / 60, "accuracy": accuracy})
        print(f"{phase:4s} step {step:5d}  {clock['training_s'] / 60:5.2f} min  accuracy {accuracy:.1%}", flush=True)
        if args.stop_at and accuracy >= args.stop_at:
            raise TargetReached
        clock["since"] = time.perf_counter()

    try:
        sft_problems = generate_problems(config.sft.num_samples, config.seed, held_out=False)
        for step in train_sft(backend, sft_problems, config.sft, config.seed, lambda record: None):
            after_step("sft", step, args.eval_every)
        grpo_problems = generate_problems(config.grpo.num_prompts, config.seed + 1, held_out=False)
        for step in train_grpo(backend, grpo_problems, config.grpo, config.seed, lambda record: None,
                               rewards=ADDITION_REWARDS):
            after_step("grpo", step, max(1, args.eval_every // 10))
    except TargetReached:
        pass

    print(f"\n| backend | target | minutes of training | phase, step |\n|---|---|---|---|")
    for target in TARGETS:
        reached = next((point for point in curve if point["accuracy"] >= target), None)
        where = f"{reached['phase']}, {reached['step']}" if reached else "not reached"
        minutes = f"{reached['minutes']:.2f}" if reached else "-"
        print(f"| {backend.name} | {target:.0%} | {minutes} | {where} |")
    final = curve[-1]
    print(f"| {backend.name} | final | {final['minutes']:.2f} | {final['accuracy']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(curve, indent=2))


if __name__ == "__main__":
    main()
