"""PyTorch vs MLX on this machine, side by side: the three operations a training run is made of.

    python bench/backends.py [--repeats 5]

Each backend runs in its own process on the tiny model with the `make demo` shapes: an SFT step
(32 sequences), sampling a GRPO group batch (16 prompts x 8, 200 new tokens, no early stop), and a
GRPO step on those 128 sequences. Prints the median seconds and the MLX/PyTorch ratio; `--backend
auto` picks PyTorch on a CPU when it is the faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(backend_name: str, repeats: int) -> dict[str, float]:
    import numpy as np

    from shared.algorithms.padding import pack_batch
    from shared.models.prompts import encode_prompts, encode_targets
    from shared.pipeline import resolve_model
    from shared.tasks.addition.data import generate_problems
    from shared.training.backend import GRPOBatch
    from shared.training.config import build_run_config
    from backends import make_backend

    config = build_run_config({"model": {"name": "tiny"}}, {})
    backend = make_backend(backend_name)
    backend.load(resolve_model("tiny"), config.model, trainable=True)
    problems = generate_problems(32, seed=0, held_out=False)
    tokenizer = backend.tokenizer
    sft_batch = pack_batch(encode_prompts(tokenizer, problems), encode_targets(tokenizer, problems),
                           tokenizer.pad_token_id)
    prompts = [p for p in encode_prompts(tokenizer, problems[:16]) for _ in range(config.grpo.group_size)]
    never_stop = {"max_new_tokens": config.grpo.max_new_tokens, "temperature": 1.0}

    def timed(action) -> float:
        action()  # warm-up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            action()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    completions = [list(np.random.default_rng(i).integers(3, len(tokenizer), 200)) for i in range(len(prompts))]
    grpo_batch = GRPOBatch(pack_batch(prompts, completions, tokenizer.pad_token_id),
                           np.random.default_rng(0).normal(size=len(prompts)).astype(np.float32), None, None)
    return {
        "SFT step (32 sequences)": timed(lambda: backend.sft_step(sft_batch, 1e-4, config.sft)),
        "sampling (128 x 200 tokens)": timed(lambda: backend.generate(prompts, seed=0, **never_stop)),
        "GRPO step (128 sequences)": timed(lambda: backend.grpo_step(grpo_batch, 1e-6, config.grpo)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.repeats)))
        return
    results = {}
    for name in ("torch", "mlx"):
        run = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{name} failed: {run.stderr.strip().splitlines()[-1]}")
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print("| operation | PyTorch (s) | MLX (s) | MLX / PyTorch |\n|---|---|---|---|")
    for operation, seconds in results["torch"].items():
        mlx_seconds = results["mlx"][operation]
        print(f"| {operation} | {seconds:.3f} | {mlx_seconds:.3f} | {mlx_seconds / seconds:.2f}x |")


if __name__ == "__main__":
    main()
