"""`eval`'s work: a checkpoint scored on its task's held-out and extra sets, and compared with another."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared.checkpoints.layouts import check_checkpoint, model_dimensions
from shared.tasks.task import Task
from shared.training.backend import Backend
from shared.training.config import EvalConfig
from shared.training.evaluation import (EvalResult, add_comparisons, evaluate, extra_sets, results_table,
                                        sampled_line)
from shared.training.problem_sets import fit_evaluation_sets, sequence_limit


@dataclass
class CheckpointEval:
    checkpoint: Path
    task: Task
    settings: EvalConfig  # num_problems, seed and max_new_tokens name the sets and their room
    ood_samples: int
    max_seq_len: int | None = None
    truncate: bool = False
    compare: Path | None = None

    def check(self) -> None:
        """Counts and the other checkpoint, before the first evaluation (which would be lost)."""
        self.task.check_count("--num-samples", self.settings.num_problems, "held_out")
        if self.task.extra_sets and self.ood_samples:
            self.task.check_count("--ood-samples", self.ood_samples, "extra")
        if self.compare:
            check_checkpoint(self.compare)


def evaluate_checkpoint(request: CheckpointEval, load: Callable[[Path], Backend], echo: Callable[[str], None]
                        ) -> dict:
    """Scores the checkpoint (and `compare` on the same problems), echoing each table as it is done; the
    results as `eval --json` writes them."""
    settings, task = request.settings, request.task
    model = load(request.checkpoint)
    sets = {"in_distribution": task.held_out(settings.num_problems, settings.seed),
            **extra_sets(task, request.ood_samples, settings.seed)}
    limit = sequence_limit(request.max_seq_len, model_dimensions(request.checkpoint))
    sets = fit_evaluation_sets(model.tokenizer, sets, settings.max_new_tokens, limit, request.truncate)

    def scored(model: Backend) -> dict[str, EvalResult]:
        return {name: evaluate(model, task.rewards, problems, settings, label=f"eval {name}")
                for name, problems in sets.items()}

    results = scored(model)
    echo(f"{request.checkpoint}\n" + results_table(results, first_column="problem set") + "\n"
         + "".join(f"{sampled_line(name, result)}\n" for name, result in results.items() if result.k))
    payload = {name: {**result.summary(), "samples": result.samples, "solved": result.solved}
               for name, result in results.items()}
    if request.compare:
        model = load(request.compare)  # the first model's memory is let go
        baseline = scored(model)
        echo(f"\n{request.compare}\n" + results_table(baseline, first_column="problem set") + "\n\n")
        echo(add_comparisons(payload, results, baseline, str(request.checkpoint), str(request.compare)) + "\n")
    return payload
