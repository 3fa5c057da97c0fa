"""`sweep`: the pipeline rerun per SFT sample count, as the seed's Results table with measured numbers."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from shared.checkpoints.folders import write_atomically
from shared.pipeline import run_training
from shared.runtime.distributed import launched_rank
from shared.runtime.errors import UsageError
from shared.training.backend import Backend
from shared.training.config import RunConfig
from shared.training.resume import is_unfinished, latest_resume_point, run_finished

logger = logging.getLogger("local_reasoning")


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


ROW_FILE = "sweep_row.json"  # in a row's folder: the minutes the sweep spent on it
UNCOMPARED = {"output_dir", "wandb_project", "export_gguf", "model.gradient_checkpointing", "sft.num_samples",
              "sft.save_every", "grpo.save_every"}


def run_sweep(config: RunConfig, counts: list[int], new_backend: Callable[[], Backend]) -> list[dict]:
    """One run per count in `{output_dir}/samples_{count}`, then sweep.json, sweep.md and sweep.png
    from every finished row in the folder. A row that finished earlier is read back, an interrupted
    one continues from its last save; a finished row with other settings is an error, before any run."""
    output = Path(config.output_dir)
    runs = [row_config(config, count) for count in counts]
    for run in runs:
        check_same_settings(run)
    for run in runs:
        folder = Path(run.output_dir)
        if run_finished(folder):
            logger.info("sweep: %d SFT problems finished earlier in %s", run.sft.num_samples, folder)
            continue
        point = latest_resume_point(folder) if is_unfinished(folder) else None
        logger.info("sweep: %d SFT problems -> %s%s", run.sft.num_samples, folder, " (continued)" if point else "")
        began = time.perf_counter()
        backend = new_backend()
        run_training(run, backend, point)
        backend.close()
        if backend.rank == 0:  # after every run, so an interrupted sweep keeps what it measured
            write_atomically(folder / ROW_FILE, json.dumps(
                {"minutes": (time.perf_counter() - began) / 60, "continued": point is not None}))
            write_sweep(output, finished_rows(config), config)
    rows = finished_rows(config)
    if rows and launched_rank() == 0:
        write_sweep(output, rows, config)
    return rows


def row_config(config: RunConfig, count: int) -> RunConfig:
    return dataclasses.replace(config, sft=dataclasses.replace(config.sft, num_samples=count),
                               output_dir=str(Path(config.output_dir) / f"samples_{count}"))


def settings(config: RunConfig) -> dict:
    """The run's settings that can change its numbers, flattened: {"grpo.lr": 2e-05, ...}."""
    flat = {}
    for name, value in json.loads(config.to_json()).items():
        for key, item in (value.items() if isinstance(value, dict) else [(None, value)]):
            flat[f"{name}.{key}" if key else name] = item
    return {name: value for name, value in flat.items() if name not in UNCOMPARED}


def differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    mine, theirs = settings(wanted), settings(saved)
    return [f"{name} {theirs.get(name)!r} (this command: {mine.get(name)!r})"
            for name in sorted(mine.keys() | theirs.keys()) if mine.get(name) != theirs.get(name)]


def saved_config(folder: Path) -> RunConfig | None:
    try:
        return RunConfig.from_json((folder / "run_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_same_settings(run: RunConfig) -> None:
    """A row that finished (or stopped) with other settings is never silently reused or replaced."""
    folder = Path(run.output_dir)
    saved = saved_config(folder) if run_finished(folder) or is_unfinished(folder) else None
    if saved is not None and (changed := differences(saved, run)):
        state = "finished" if run_finished(folder) else "stopped"
        raise UsageError(f"{folder} {state} with other settings: {'; '.join(changed[:3])}; "
                         "use another --output-dir, or move that folder away")


def finished_rows(config: RunConfig) -> list[dict]:
    """A row per finished run in the sweep folder with this sweep's settings, fewest SFT problems first."""
    rows = []
    for folder in sorted(Path(config.output_dir).glob("samples_*")):
        saved = saved_config(folder)
        if not run_finished(folder) or saved is None or differences(saved, row_config(config, saved.sft.num_samples)):
            continue
        try:
            evaluations = json.loads((folder / "eval.json").read_text())
        except (OSError, ValueError):
            continue
        stages = evaluations["in_distribution"]
        timing = json.loads((folder / ROW_FILE).read_text()) if (folder / ROW_FILE).exists() else {}
        rows.append({"num_samples": saved.sft.num_samples, "sft_accuracy": stages["after_sft"]["accuracy"],
                     "grpo_accuracy": stages["after_grpo"]["accuracy"] if "after_grpo" in stages else None,
                     "grpo_vs_sft": evaluations.get("grpo_vs_sft"), "minutes": timing.get("minutes"),
                     "continued": timing.get("continued", False)})
    return sorted(rows, key=lambda row: row["num_samples"])


def sweep_table(rows: list[dict]) -> str:
    lines = ["| training data (SFT problems) | accuracy after SFT | accuracy after SFT + GRPO | GRPO's paired gain "
             "| McNemar p | minutes |", "|---|---|---|---|---|---|"]
    for row in rows:
        grpo = "–" if row["grpo_accuracy"] is None else f"{row['grpo_accuracy']:.1%}"
        paired = row.get("grpo_vs_sft")
        gain, p_value = (f"{100 * paired['difference']:+.1f} points (+{paired['gained']} / -{paired['lost']})",
                         f"{paired['p_value']:.2g}") if paired else ("–", "–")
        minutes = "–" if row["minutes"] is None else \
            f"{row['minutes']:.1f}" + (" (last part; the run was continued)" if row["continued"] else "")
        lines.append(f"| {row['num_samples']:,} samples | {row['sft_accuracy']:.1%} | {grpo} | {gain} | {p_value} "
                     f"| {minutes} |")
    return "\n".join(lines)


def write_sweep(output: Path, rows: list[dict], config: RunConfig) -> None:
    output.mkdir(parents=True, exist_ok=True)
    write_atomically(output / "sweep.json", json.dumps({"rows": rows, "config": json.loads(config.to_json())},
                                                       indent=2))
    header = (f"Model `{config.model.name}`, task `{config.task.name}`, backend `{config.backend}`, held-out "
              f"problems per evaluation: {config.eval.num_problems}, GRPO prompts per run: "
              f"{config.grpo.num_prompts}.\n\n")
    write_atomically(output / "sweep.md", header + sweep_table(rows) + "\n")
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
