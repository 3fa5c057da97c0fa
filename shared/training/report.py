"""The run report written at the end of every `train`: report.md with the results and PNG plots."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from shared.training.evaluation import EvalResult, paired_line, results_table, sampled_line

logger = logging.getLogger("local_reasoning")


def global_steps(records: list[dict]) -> list[int]:
    """Each record's position on one axis through both phases: SFT steps, then GRPO steps after them."""
    positions, steps = [], 0
    for record in records:
        if record.get("phase") in ("sft", "grpo"):
            steps += 1
        positions.append(steps)
    return positions


def moving_average(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window or window <= 1:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def write_plots(records: list[dict], folder: Path, reward_weights: dict[str, float]) -> list[Path]:
    """loss.png, rewards.png (GRPO: each of the task's rewards), accuracy.png: whichever the records have data for."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib); the report has no plots")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    phases = {phase: [r for r in records if r.get("phase") == phase] for phase in ("sft", "grpo")}

    # GRPO's on-policy loss is ~0 by construction (its gradient is what moves), so only SFT's is drawn
    if phases["sft"]:
        figure, axis = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in phases["sft"]]
        losses = [r["loss"] for r in phases["sft"]]
        axis.plot(steps, losses, alpha=0.35, label="per step")
        window = max(1, len(losses) // 50)
        if window > 1:
            axis.plot(steps[window - 1:], moving_average(losses, window), label=f"mean of {window} steps")
        axis.set(title="SFT loss (completion tokens)", xlabel="SFT step", ylabel="cross-entropy per token",
                 yscale="log")
        axis.grid(alpha=0.3)
        axis.legend()
        written.append(save(figure, folder / "loss.png"))

    if phases["grpo"]:
        figure, axis = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in phases["grpo"]]
        window = max(1, len(steps) // 20)
        styles = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))  # distinct, since components often coincide
        for index, name in enumerate(reward_weights):
            values = [r.get(f"reward_{name}", np.nan) for r in phases["grpo"]]
            axis.plot(steps[window - 1:], moving_average(values, window), linestyle=styles[index % len(styles)],
                      linewidth=2, label=name)
        combined = [r["reward"] / sum(reward_weights.values()) for r in phases["grpo"]]
        axis.plot(steps[window - 1:], moving_average(combined, window), color="black", linewidth=1,
                  label="combined / max")
        axis.set(title=f"GRPO rewards per component (mean of {window} steps)", xlabel="GRPO step",
                 ylabel="mean reward of the sampled completions", ylim=(-0.02, 1.02))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
        written.append(save(figure, folder / "rewards.png"))

    evaluations = [(position, r) for position, r in zip(global_steps(records), records)
                   if r.get("phase") == "eval" and not str(r.get("stage", "")).startswith("ood_")]
    if evaluations:
        written.append(save(accuracy_figure(evaluations, len(phases["sft"]) if phases["grpo"] else None),
                            folder / "accuracy.png"))
    return written


def accuracy_figure(evaluations: list[tuple[int, dict]], grpo_starts: int | None):
    """Each evaluation a point, never joined: a line would draw a curve between evaluations that was
    never measured. Those along the run (on fewer problems) are hollow."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.8))
    for metric, label, color in (("accuracy", "accuracy", "C0"), ("format_compliance", "format", "C1")):
        for along_the_run in (False, True):
            points = [(p, r) for p, r in evaluations if ("step" in r) == along_the_run]
            if not points:
                continue
            count = points[0][1].get("num_problems")
            style = {"markersize": 4, "markerfacecolor": "none"} if along_the_run else {"markersize": 7}
            axis.plot([p for p, _ in points], [100 * r[metric] for _, r in points], marker="o", linestyle="none",
                      color=color, label=f"{label}{' along the run' if along_the_run else ''}"
                      f"{f' ({count} problems)' if count else ''}", **style)
    if grpo_starts is not None:
        axis.axvline(grpo_starts, color="grey", linestyle="--", linewidth=1)
        axis.text(grpo_starts, 50, " GRPO starts", color="grey")
    axis.set(title="Held-out accuracy during training (greedy)", xlabel="optimiser step (SFT, then GRPO)",
             ylabel="% of held-out problems", ylim=(-2, 102))
    axis.grid(alpha=0.3)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")  # below: never on a point
    return figure


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(figure)
    return path


def peak_memory_table(records: list[dict], stage_labels: dict[str, str]) -> str:
    """The most memory each phase and evaluation took (resident memory on CPU, the GPU's allocations on CUDA and
    MLX), from the records that measured it."""
    peaks: dict[str, float] = {}
    for record in records:
        if "peak_memory_gb" in record:
            stage = record.get("stage", "")
            name = record["phase"].upper() if record["phase"] != "eval" else \
                f"evaluation {stage_labels.get(stage, stage.replace('_', ' '))}"
            peaks[name] = max(peaks.get(name, 0.0), record["peak_memory_gb"])
    rows = [f"| {name} | {gb:.2f} |" for name, gb in peaks.items()]
    return "\n".join(["| phase | peak memory (GB) |", "|---|---|", *rows]) if rows else ""


def sample_block(result: EvalResult, count: int = 2) -> str:
    blocks = []
    for sample in result.samples[:count]:
        mark = "correct" if sample["correct"] else "wrong"
        blocks.append(f"**{sample['prompt']}** ({mark})\n\n```\n{sample['completion']}\n```")
    return "\n\n".join(blocks)


def write_report(output: Path, run_config_json: str, records: list[dict], results: dict[str, EvalResult],
                 out_of_distribution: dict[str, EvalResult], timings: dict[str, float],
                 stage_labels: dict[str, str], grpo_gain: dict | None = None) -> Path:
    output = Path(output)
    config = json.loads(run_config_json)
    plots = write_plots(records, output / "plots", config["grpo"]["reward_weights"])
    minutes = ", ".join(f"{name.removesuffix('_s').upper()} {seconds / 60:.1f} min"
                        for name, seconds in timings.items())
    lines = [
        "# Training report", "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · model `{config['model']['name']}` · task "
        f"`{config.get('task', {}).get('name', 'addition')}` · backend "
        f"`{config['backend']}` · mode `{config['mode']}` · {minutes or 'no training'}", "",
        f"## Held-out problems ({next(iter(results.values())).num_problems if results else 0}, greedy)", "",
        results_table({stage_labels[s]: r for s, r in results.items()}), "",
    ]
    lines += [f"Sampled {sampled_line(stage_labels[s], r)}.\n" for s, r in results.items() if r.k]
    if grpo_gain:
        lines += [paired_line(grpo_gain, "after SFT", "after GRPO") + ".", ""]
    if out_of_distribution:
        lines += ["## Out of distribution (after the last phase)", "",
                  results_table(out_of_distribution, first_column="problem set"), ""]
    if memory := peak_memory_table(records, stage_labels):
        lines += ["## Peak memory", "", memory, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    if results:
        first, last = next(iter(results)), list(results)[-1]
        lines += [f"## Samples {stage_labels[first]}", "", sample_block(results[first]), ""]
        if last != first:
            lines += [f"## Samples {stage_labels[last]}", "", sample_block(results[last]), ""]
    lines += ["## Configuration", "", "```json", run_config_json, "```", ""]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    return path
