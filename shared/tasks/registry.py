"""The tasks by name: a built-in one or a JSONL file, with a reward file's rewards added."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from shared.runtime.errors import UsageError
from shared.tasks.addition.task import AdditionTask
from shared.tasks.countdown import CountdownTask
from shared.tasks.file_task import FileTask
from shared.tasks.reward_file import load_reward_file
from shared.tasks.task import Task, TaskConfig, existing_file, file_sha256

BUILT_IN_TASKS = {"addition": AdditionTask, "countdown": CountdownTask}


def task_config(name: str, reward_file: str | Path | None = None) -> TaskConfig:
    """--task and --reward-file as a run records them: files by absolute path, with their sha256."""
    if name in BUILT_IN_TASKS:
        config = TaskConfig(name)
    else:
        path = existing_file(name, "--task", f"a built-in task ({', '.join(BUILT_IN_TASKS)}) or a JSONL file")
        config = TaskConfig(str(path), file_sha256(path))
    if reward_file is not None:
        path = existing_file(reward_file, "--reward-file", "a Python file that defines REWARDS")
        config.reward_file, config.reward_file_sha256 = str(path), file_sha256(path)
    return config


def load_task(config: TaskConfig) -> Task:
    """The task a run's settings name, with the reward file's rewards added (a built-in name is replaced). Loaded
    once per process for the same files: a reward file's top level runs once, however often a run asks."""
    return loaded_task(config.name, config.sha256, config.reward_file, config.reward_file_sha256)


@functools.lru_cache(maxsize=16)
def loaded_task(name: str, sha256: str | None, reward_file: str | None, reward_file_sha256: str | None) -> Task:
    task: Task = BUILT_IN_TASKS.get(name, FileTask)(name)
    if reward_file:
        task.rewards = {**task.rewards, **load_reward_file(Path(reward_file))}
    return task


def checkpoint_task(checkpoint: Path, name: str | None, reward_file: str | Path | None,
                    checkpoint_rewards: bool = True) -> Task:
    """The task of `eval` and `infer`: --task, else the one the checkpoint was trained on (addition before
    tasks), with its reward file unless `checkpoint_rewards` is off (`infer`, which has no --reward-file)."""
    saved: dict = {}
    if name is None and (checkpoint / "run_config.json").is_file():
        try:
            saved = json.loads((checkpoint / "run_config.json").read_text()).get("task") or {}
        except (OSError, ValueError, AttributeError):
            saved = {}
    saved_rewards = saved.get("reward_file") if checkpoint_rewards and not reward_file else None
    for kind, path in (("task", saved.get("name")), ("reward-file", saved_rewards)):
        if path and path not in BUILT_IN_TASKS and not Path(path).is_file():
            raise UsageError(f"{checkpoint} was trained with {path}, which is not there any more: give --{kind} FILE")
    return load_task(task_config(name or saved.get("name", "addition"), reward_file or saved_rewards))
