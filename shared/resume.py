"""Where a run stands, saved with every checkpoint, so an interrupted run continues where it stopped.

A resume point is a checkpoint folder (weights, optimizer moments, run_config.json) that also holds
training_state.json: the phase, the last finished step, the evaluations so far and how many
metrics.jsonl records belong before it. The step is the whole data position and RNG state: batches
come from a permutation seeded by the run's seed, and every random draw of a step is seeded from
(seed, phase, step), so skipping `step` batches and reseeding replays the run exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.errors import UserError
from shared.evaluation import EvalResult

STATE_FILE = "training_state.json"
RUN_STATUS_FILE = "run_status.json"
PERIODIC_FOLDER = "checkpoints"
FINAL_FOLDERS = {"sft": "sft_final", "grpo": "reasoning_final"}
PHASES = ("sft", "grpo")


class Interrupted(UserError):
    """Ctrl-C during training: a resume point was saved, exit like any interrupted command."""

    exit_code = 130


@dataclass
class RunState:
    phase: str = "sft"
    step: int = 0  # optimiser steps of `phase` finished
    total_steps: int = 0
    metrics_records: int = 0  # metrics.jsonl lines written up to this point
    results: dict[str, EvalResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def progress(self) -> tuple[int, int]:
        return PHASES.index(self.phase), self.step

    @property
    def phase_complete(self) -> bool:
        return self.step >= self.total_steps > 0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "results": {k: asdict(v) for k, v in self.results.items()}}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        values = json.loads(text)
        values["results"] = {k: EvalResult(**v) for k, v in values["results"].items()}
        return cls(**values)


def phase_steps(count: int, batch_size: int, epochs: int) -> int:
    return math.ceil(count / batch_size) * epochs


def step_seed(seed: int, phase: str, step: int) -> int:
    """The seed of everything random in one optimiser step."""
    return (seed * 1_000_003 + PHASES.index(phase) * 100_003 + step) % 2**31


def periodic_folder(output: Path, phase: str, step: int) -> Path:
    return Path(output) / PERIODIC_FOLDER / f"{phase}-step-{step:06d}"


def resume_points(output: Path) -> list[tuple[RunState, Path]]:
    """Every complete checkpoint of the run in `output` that it can continue from, latest last."""
    output = Path(output)
    folders = [output / name for name in FINAL_FOLDERS.values()]
    if (output / PERIODIC_FOLDER).is_dir():
        folders += [p for p in (output / PERIODIC_FOLDER).iterdir() if not p.name.startswith(".")]
    points = []
    for folder in folders:
        try:
            points.append((RunState.from_json((folder / STATE_FILE).read_text()), folder))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not a resume point (or from an older version): never one to continue from
    return sorted(points, key=lambda point: point[0].progress)


def latest_resume_point(output: Path) -> tuple[RunState, Path] | None:
    points = resume_points(output)
    return points[-1] if points else None


def drop_older_periodic(output: Path, keep: Path) -> None:
    """One periodic checkpoint is enough: each is complete before the one before it goes."""
    for folder in (Path(output) / PERIODIC_FOLDER).iterdir():
        if folder != keep and not folder.name.startswith("."):
            shutil.rmtree(folder, ignore_errors=True)


def write_run_status(output: Path, finished: bool) -> None:
    path = Path(output) / RUN_STATUS_FILE
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps({"finished": finished}))
    os.replace(staging, path)


def is_unfinished(output: Path) -> bool:
    """A run was started in `output`, did not finish, and left something to continue from."""
    try:
        finished = json.loads((Path(output) / RUN_STATUS_FILE).read_text())["finished"]
    except (OSError, ValueError, KeyError):
        return False
    return not finished and latest_resume_point(output) is not None


class StopRequest:
    """Ctrl-C during training asks the loop to stop after the current step (a second one stops at once)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)", file=sys.stderr,
              flush=True)


@contextmanager
def stop_on_interrupt():
    """Yields a StopRequest that SIGINT sets while the block runs (the main thread only)."""
    request = StopRequest()
    try:
        previous = signal.signal(signal.SIGINT, request)
    except ValueError:  # not the main thread: Ctrl-C keeps its default
        yield request
        return
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
