"""Time-to-accuracy of the `make demo` settings: minutes of training to reach 90 % and 97 % held-out.

    python bench/time_to_accuracy.py [--backend torch] [--eval-every 100] [--eval-problems 300] [--stop-at 0.97]
    python bench/run.py --only time-to-accuracy [--quick]

Trains SFT then GRPO with the tiny model's preset, evaluating greedily every N optimiser steps;
the clock counts training only (evaluation time is excluded). Prints a markdown table and the curve.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the project's root

from bench.common import Rows, row  # noqa: E402
from shared.pipeline import resolve_model  # noqa: E402
from shared.runtime.progress import setup_logging  # noqa: E402
from shared.tasks.addition.data import generate_problems  # noqa: E402
from shared.tasks.addition.rewards import ADDITION_REWARDS  # noqa: E402
from shared.training.config import build_run_config  # noqa: E402
from shared.training.evaluation import evaluate  # noqa: E402
from shared.training.loops import train_grpo, train_sft  # noqa: E402
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


def rows(quick: bool) -> Rows:
    """Minutes of training (evaluation excluded) to 90 % and 97 % held-out accuracy, demo settings, each
    backend's curve from this script in its own process; `quick`: PyTorch only, stopping once 97 % is reached."""
    for backend_name in ("torch",) if quick else ("torch", "mlx"):
        curve_file = Path(f"/tmp/bench_time_to_accuracy_{backend_name}.json")
        began = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--backend", backend_name, "--eval-every", "150",
                        "--eval-problems", "500", "--json", str(curve_file), *(["--stop-at", "0.97"] if quick else [])],
                       check=True, capture_output=True, cwd=ROOT)
        print(f"  time_to_accuracy {backend_name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        curve = json.loads(curve_file.read_text())
        best = max(point["accuracy"] for point in curve)
        for target in TARGETS:
            reached = next((point["minutes"] for point in curve if point["accuracy"] >= target), None)
            note = "" if reached is not None else f", not reached: best {best:.1%} in {curve[-1]['minutes']:.1f} min"
            yield row(f"time to {target:.0%} held-out accuracy, demo settings ({backend_name}{note})", reached,
                      None, "minutes", 10.0 if target == 0.97 else None, True)


if __name__ == "__main__":
    main()
