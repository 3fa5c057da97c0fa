"""--reward-file: the user's own reward functions, loaded from the Python file they name (only then).

The file defines `REWARDS = {"name": (function, weight), ...}`, each `function(completion, example)`
returning a number, with `example` the task's JSONL line (or a built-in problem's fields) as a dict.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import traceback
from pathlib import Path
from typing import Callable

from shared.runtime.errors import UsageError
from shared.tasks.task import Reward, TaskProblem

EXAMPLE = 'REWARDS = {"name": (function, weight)}'


def load_reward_file(path: Path) -> dict[str, Reward]:
    """The file's REWARDS, each function called with the problem's fields; a one-line UsageError for a file
    that does not import or an entry that is not (function, number)."""
    spec = importlib.util.spec_from_file_location(f"reward_file_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--reward-file {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as error:  # the user's code: whatever it raises (even SystemExit) is one line
        if isinstance(error, KeyboardInterrupt):
            raise
        raise UsageError(f"--reward-file {path} does not import: {error_summary(error, path)}") from None
    rewards = getattr(module, "REWARDS", None)
    if not isinstance(rewards, dict) or not rewards:
        raise UsageError(f"--reward-file {path} defines no REWARDS: it needs {EXAMPLE}")
    loaded = {}
    for name, entry in rewards.items():
        if not (isinstance(name, str) and name.isidentifier() and isinstance(entry, tuple) and len(entry) == 2
                and callable(entry[0]) and isinstance(entry[1], numbers.Real) and math.isfinite(entry[1])):
            raise UsageError(f"--reward-file {path}: REWARDS[{name!r}] must be (function, weight) with a name of "
                             f"letters, digits and _, got {entry!r:.60}")
        loaded[name] = Reward(with_example_fields(entry[0]), float(entry[1]))
    return loaded


def with_example_fields(function: Callable[[str, dict], float]) -> Callable[[str, TaskProblem], float]:
    def reward(completion: str, problem: TaskProblem) -> float:
        return function(completion, problem.fields())
    return reward


def error_summary(error: BaseException, path: Path) -> str:
    """'NameError: name 'x' is not defined (line 3)': the error and where in the user's file it happened."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} (line {error.lineno})"
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path]
    return f"{type(error).__name__}: {error}" + (f" (line {lines[-1]})" if lines else "")

