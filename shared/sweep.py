"""`sweep`: the pipeline rerun per SFT sample count, as the seed's Results table with measured numbers."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from shared.backend import Backend
from shared.config import RunConfig
from shared.errors import UsageError
from shared.pipeline import run_training
from shared.run_records import move_to_earlier

logger = logging.getLogger("local_reasoning")
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")


def parse_counts(text: str) -> list[int]:
    """'100,500,1000' -> [100, 500, 1000]; a one-line error for anything else."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--num-samples takes whole numbers separated by commas, like 100,500,1000; got {text!r}") \
            from None
    if not counts or counts[0] < 1:
        raise UsageError(f"--num-samples needs positive counts, like 100,500,1000; got {text!r}")
    return counts


def run_sweep(config: RunConfig, counts: list[int], new_backend: Callable[[], Backend]) -> list[dict]:
    """One run per count in `{output_dir}/samples_{count}`, then sweep.json, sweep.md and sweep.png."""
    output = Path(config.output_dir)
    rows = []
    for count in counts:
        run = dataclasses.replace(config, sft=dataclasses.replace(config.sft, num_samples=count),
                                  output_dir=str(output / f"samples_{count}"))
        logger.info("sweep: %d SFT problems -> %s", count, run.output_dir)
        began = time.perf_counter()
        backend = new_backend()
        results, _ = run_training(run, backend)
        rows.append({"num_samples": count, "sft_accuracy": results["after_sft"].accuracy,
                     "grpo_accuracy": results["after_grpo"].accuracy if "after_grpo" in results else None,
                     "minutes": (time.perf_counter() - began) / 60})
        if backend.rank == 0:  # after every run, so an interrupted sweep keeps what it measured
            if len(rows) == 1:
                move_to_earlier(output, SWEEP_FILES, "sweep")  # an earlier sweep's table is kept, not replaced
            write_sweep(output, rows, config)
    backend.close()
    return rows


def sweep_table(rows: list[dict]) -> str:
    lines = ["| training data (SFT problems) | accuracy after SFT | accuracy after SFT + GRPO | minutes |",
             "|---|---|---|---|"]
    for row in rows:
        grpo = "–" if row["grpo_accuracy"] is None else f"{row['grpo_accuracy']:.1%}"
        lines.append(f"| {row['num_samples']:,} samples | {row['sft_accuracy']:.1%} | {grpo} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def write_sweep(output: Path, rows: list[dict], config: RunConfig) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "sweep.json").write_text(json.dumps({"rows": rows, "config": json.loads(config.to_json())}, indent=2))
    header = (f"Model `{config.model.name}`, backend `{config.backend}`, held-out problems per evaluation: "
              f"{config.eval.num_problems}, GRPO prompts per run: {config.grpo.num_prompts}.\n\n")
    (output / "sweep.md").write_text(header + sweep_table(rows) + "\n")
    plot_sweep(rows, output / "sweep.png")


def plot_sweep(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    counts = [row["num_samples"] for row in rows]
    # points only: a line would draw accuracies at sample counts that were never run
    axis.plot(counts, [100 * row["sft_accuracy"] for row in rows], marker="o", linestyle="none", label="after SFT")
    with_grpo = [row for row in rows if row["grpo_accuracy"] is not None]
    if with_grpo:
        axis.plot([row["num_samples"] for row in with_grpo], [100 * row["grpo_accuracy"] for row in with_grpo],
                  marker="s", linestyle="none", label="after SFT + GRPO")
    axis.set(xscale="log", title="Held-out accuracy against SFT training data", xlabel="SFT problems (log scale)",
             ylabel="% of held-out problems", ylim=(-2, 102))
    axis.set_xticks(counts, [f"{count:,}" for count in counts])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
