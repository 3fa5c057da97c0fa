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
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.checkpoints.folders import write_atomically
from shared.checkpoints.layouts import RUN_CONFIG_FILE, checkpoint_kind
from shared.checkpoints.lora_files import read_adapter
from shared.models.hardware import resolve_backend
from shared.runtime.distributed import launched_processes
from shared.runtime.errors import UsageError, UserError
from shared.tasks.task import existing_file, file_sha256
from shared.training.config import OPTION_FIELDS, RunConfig, config_field, option_values, run_config_from_options
from shared.training.evaluation import EvalResult

STATE_FILE = "training_state.json"
RUN_STATUS_FILE = "run_status.json"
PERIODIC_FOLDER = "checkpoints"
FINAL_FOLDERS = {"sft": "sft_final", "grpo": "reasoning_final"}
PHASES = ("sft", "grpo")


@dataclass
class RunState:
    phase: str = "sft"
    step: int = 0  # optimiser steps of `phase` finished
    total_steps: int = 0
    metrics_records: int = 0  # metrics.jsonl lines written up to this point
    results: dict[str, EvalResult] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    prompt_pool: dict | None = None  # GRPO's pass rates per prompt, with --dynamic-sampling

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
    write_atomically(Path(output) / RUN_STATUS_FILE, json.dumps({"finished": finished}))


def run_status(output: Path) -> bool | None:
    """Whether the run last started in `output` finished; None where no run has been there."""
    try:
        return bool(json.loads((Path(output) / RUN_STATUS_FILE).read_text())["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_finished(output: Path) -> bool:
    return run_status(output) is True


def is_unfinished(output: Path) -> bool:
    """A run was started in `output`, did not finish, and left something to continue from."""
    return run_status(output) is False and latest_resume_point(output) is not None


def run_to_start(options: dict, given: dict[str, str]) -> tuple[RunConfig, tuple[RunState, Path] | None]:
    """The resume policy of `train`: the run's settings, with its backend resolved, and the resume point
    to continue from (None: start fresh).

    `options` are the command's values; `given` maps the options typed on the command line to the
    flag typed. With --resume the run continues with its own settings; without it, the same
    command again on an interrupted run continues it, and other settings there are an error.
    """
    if options["resume"]:
        return resumed_run_config(options, given)
    checkpoint = options["sft_checkpoint"] if options["mode"] == "grpo" else None
    config = run_config_from_options(options, checkpoint_settings(Path(checkpoint), options, given)
                                     if checkpoint else None)
    config.backend = resolve_backend(config.backend, Path(config.sft_checkpoint) if config.mode == "grpo" else None)
    return config, unfinished_run_to_continue(config)


def checkpoint_settings(folder: Path, options: dict, given: dict[str, str]) -> dict[str, dict]:
    """The settings GRPO takes from its starting checkpoint: the model (and so the preset), fine-tuning
    and SFT settings of the run that wrote it (its run_config.json), and an adapter's own LoRA shape.
    A flag that contradicts the model or the adapter is an error; a fully trained model may take new
    LoRA adapters."""
    saved = {}
    if (folder / RUN_CONFIG_FILE).is_file():
        try:
            saved = asdict(RunConfig.from_json((folder / RUN_CONFIG_FILE).read_text()))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{folder}/{RUN_CONFIG_FILE} is not a run configuration this version reads") from None
    model = saved.get("model", {})
    model.pop("trust_remote_code", None)  # a model's own code runs only when this command asks
    model.pop("gradient_checkpointing", None)  # and memory is this machine's
    fixed = {"model.name": (model["name"], RUN_CONFIG_FILE)} if model else {}
    kind = checkpoint_kind(folder) if folder.is_dir() else None
    if kind in ("peft", "mlx_lora"):
        adapter = read_adapter(folder, kind)
        for name, value in (("finetune", "lora"), ("lora_rank", adapter.rank),
                            ("lora_alpha", adapter.rank * adapter.scale)):
            model[name], fixed[f"model.{name}"] = value, (value, "its adapter")
    for name, path in OPTION_FIELDS.items():
        if name in given and path in fixed and not same_setting(options[name], fixed[path][0]):
            value, source = fixed[path]
            raise UsageError(f"{given[name]} {options[name]} contradicts {folder}, whose {path.split('.')[1]} is "
                             f"{value!r} ({source}): leave {given[name]} out, GRPO continues with the checkpoint's")
    return {"model": model, "sft": saved.get("sft", {}), "task": saved.get("task")}


def same_setting(given, saved) -> bool:
    if isinstance(saved, float) or isinstance(given, float):
        return math.isclose(float(given), float(saved))
    return given == saved or (Path(str(given)).exists() and Path(str(given)).resolve() == Path(str(saved)).resolve())


def resumed_run_config(options: dict, given: dict[str, str]) -> tuple[RunConfig, tuple[RunState, Path]]:
    """--resume: the run's own settings from its run_config.json, and its last resume point.

    Options repeated from the original command are fine; one that changes a setting is an error.
    """
    output = Path(options["output_dir"])
    point = latest_resume_point(output)
    if point is None:
        raise UserError(f"{output} holds no checkpoint to resume from (a run saves one every --save-every steps)")
    if not is_unfinished(output):
        raise UserError(f"the run in {output} has finished; there is nothing to resume")
    config = RunConfig.from_json((output / "run_config.json").read_text())
    for name, value in option_values(options).items():
        saved = config_field(config, OPTION_FIELDS[name])
        if name in given and name == "gradient_checkpointing":  # memory, not numbers: may change on resume
            config.model.gradient_checkpointing = value
        elif name in given and value != saved and not (name == "trust_remote_code" and not saved):
            raise UsageError(f"{given[name]} {value} differs from the run's {saved} ({output}/run_config.json); "
                             "--resume continues with the run's own settings")
    resumed_task(config, options, output)
    if config.processes != launched_processes():
        raise UsageError(f"this run trained with {config.processes} process(es); resume it with the same number "
                         f"(it was launched with {launched_processes()})")
    if options["backend"] not in ("auto", config.backend):
        raise UsageError(f"this run trained with --backend {config.backend}; it resumes on the same backend")
    resolve_backend(config.backend, Path(config.sft_checkpoint) if config.mode == "grpo" else None)  # or an error
    if options["save_every"] is not None:
        config.sft.save_every = config.grpo.save_every = options["save_every"]
    if options["no_wandb"] or options["wandb_project"]:
        config.wandb_project = None if options["no_wandb"] else options["wandb_project"]
    if options["export_gguf"]:  # what happens after the run: asking for it on resume is fine
        config.export_gguf = options["export_gguf"]
    return config, point


def resumed_task(config: RunConfig, options: dict, output: Path) -> None:
    """--resume continues the run's own task on the same file; a reward file is read again (fixing one that
    failed is a reason to resume)."""
    task = config.task
    for name, flag, saved in (("task", "--task", task.name), ("reward_file", "--reward-file", task.reward_file)):
        if options[name] is not None and not same_setting(options[name], saved):
            raise UsageError(f"{flag} {options[name]} differs from the run's {saved} ({output}/run_config.json); "
                             "--resume continues with the run's own task")
    if task.sha256 and file_sha256(existing_file(task.name, "the run's task", "the file it trained on")) != task.sha256:
        raise UserError(f"{task.name} changed since the run started; --resume needs the same file (or start a new "
                        "run in another --output-dir)")
    if task.reward_file:
        reward_file = existing_file(task.reward_file, "the run's --reward-file", "a Python file")
        task.reward_file_sha256 = file_sha256(reward_file)


def unfinished_run_to_continue(config: RunConfig) -> tuple[RunState, Path] | None:
    """The same command again on an interrupted run continues it; other settings there are an error."""
    output = Path(config.output_dir)
    if not is_unfinished(output):
        return None
    saved = RunConfig.from_json((output / "run_config.json").read_text())
    if not same_run(saved, config):
        raise UserError(f"{output} holds an unfinished run with other settings: continue it with "
                        f"python cli.py train --resume --output-dir {output}, or choose another --output-dir")
    return latest_resume_point(output)


def same_run(a: RunConfig, b: RunConfig) -> bool:
    """Equal in everything that decides the numbers (not where they are logged, how often saved, or exported)."""
    def essentials(config: RunConfig) -> dict:
        values = json.loads(config.to_json())
        values.pop("wandb_project"), values.pop("export_gguf", None)
        values["model"].pop("gradient_checkpointing", None)
        values["sft"].pop("save_every"), values["grpo"].pop("save_every")
        return values
    return essentials(a) == essentials(b)


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
