"""Data-parallel scaling: the same tiny-model SFT and GRPO budget under torchrun with 1 and with 2
processes (gloo on this CPU, loopback only); prints SFT and GRPO samples per second and the ratio.

    python bench/data_parallel.py [--processes 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ["--model", "tiny", "--backend", "torch", "--mode", "full", "--num-samples", "1024", "--sft-batch-size", "32",
          "--grpo-samples", "32", "--prompts-per-step", "8", "--eval-samples", "8", "--ood-samples", "0",
          "--save-every", "0", "--no-wandb", "--log-level", "WARNING"]


def measure(processes: int) -> dict:
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   str(ROOT / "cli.py"), "train", *BUDGET, "--output-dir", output]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // processes))}
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["phase"] == "sft"][1:]  # the first step of each phase warms up
    grpo = [r for r in records if r["phase"] == "grpo"][1:]
    return {"SFT samples/s": 32 * len(sft) / sum(r["step_s"] for r in sft),
            "GRPO samples/s": 8 * 8 * len(grpo) / sum(r["step_s"] for r in grpo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="process counts to compare, comma-separated")
    counts = [int(n) for n in parser.parse_args().processes.split(",")]
    rows = {n: measure(n) for n in counts}
    print(f"| processes | {' | '.join(rows[counts[0]])} |\n|---|---|---|")
    for n, row in rows.items():
        print(f"| {n} | " + " | ".join(f"{value:.1f} ({value / rows[counts[0]][name]:.2f}x)"
                                       for name, value in row.items()) + " |")


if __name__ == "__main__":
    main()
