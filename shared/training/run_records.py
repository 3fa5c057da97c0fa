"""A run's records in its output folder: a new run never loses an earlier run's. Their files move to
earlier_runs/, and a GRPO run from the folder's own finished SFT run continues that run's records
(metrics.jsonl goes on, eval.json keeps the evaluations before and after SFT)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

from shared.training.config import RunConfig
from shared.training.evaluation import EvalResult
from shared.training.resume import FINAL_FOLDERS, RUN_STATUS_FILE, RunState, run_finished

logger = logging.getLogger("local_reasoning")

EARLIER_FOLDER = "earlier_runs"
RECORDS = ("run_config.json", "metrics.jsonl", "eval.json", "report.md", "plots", RUN_STATUS_FILE)


def continues_sft_run(output: Path, config: RunConfig) -> bool:
    """A GRPO run from output/sft_final, where the finished run of `output` was an SFT run."""
    if config.mode != "grpo" or not run_finished(output):
        return False
    if Path(config.sft_checkpoint).resolve() != (Path(output) / FINAL_FOLDERS["sft"]).resolve():
        return False
    try:
        return json.loads((Path(output) / "run_config.json").read_text())["mode"] == "sft"
    except (OSError, ValueError, KeyError):
        return False


def move_earlier_records(output: Path) -> Path | None:
    """The earlier run's record files moved to earlier_runs/<when>-<mode>/; None where there were none."""
    try:
        mode = json.loads((Path(output) / "run_config.json").read_text())["mode"]
    except (OSError, ValueError, KeyError, TypeError):
        mode = "run"
    return move_to_earlier(output, RECORDS, mode)


def move_to_earlier(output: Path, names: tuple[str, ...], label: str) -> Path | None:
    """These files of an earlier run (the first says whether there was one) moved to
    earlier_runs/<when it was written>-<label>/; None where there were none."""
    output = Path(output)
    if not (output / names[0]).exists():
        return None
    when = datetime.fromtimestamp((output / names[0]).stat().st_mtime).strftime("%Y-%m-%d-%H%M%S")
    folder, number = output / EARLIER_FOLDER / f"{when}-{label}", 1
    while folder.exists():
        number += 1
        folder = output / EARLIER_FOLDER / f"{when}-{label}-{number}"
    folder.mkdir(parents=True)
    for name in names:
        if (output / name).exists():
            os.replace(output / name, folder / name)
    return folder


def start_records(output: Path, config: RunConfig) -> RunState:
    """A fresh run's starting state: the earlier run's records kept in earlier_runs/, and carried on
    where this run continues the folder's SFT run."""
    continues = continues_sft_run(output, config)
    earlier = move_earlier_records(output)
    if earlier is None:
        return RunState()
    logger.info("the earlier run's records in %s are kept in %s", output, earlier)
    if not continues:
        return RunState()
    try:
        evaluations = json.loads((earlier / "eval.json").read_text())
        results = {stage: EvalResult(**values) for stage, values in evaluations["in_distribution"].items()}
        shutil.copyfile(earlier / "metrics.jsonl", Path(output) / "metrics.jsonl")
    except (OSError, ValueError, KeyError, TypeError):  # incomplete records: they stay in earlier_runs/ only
        return RunState()
    logger.info("GRPO continues the records of the SFT run in %s", output)
    records = len((Path(output) / "metrics.jsonl").read_text().splitlines())
    return RunState(metrics_records=records, results=results, timings=evaluations.get("timings", {}))
