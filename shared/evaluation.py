"""Greedy evaluation on held-out problems: accuracy, format, step validity, length."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared.backend import Backend
from shared.config import EvalConfig
from shared.data import Problem
from shared.progress import progress_bar
from shared.prompts import decode_completion, encode_prompts
from shared.rewards import reward_components


@dataclass
class EvalResult:
    num_problems: int
    accuracy: float
    format_compliance: float
    step_validity: float
    verification: float
    mean_completion_tokens: float
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "samples"}


def score_completions(problems: list[Problem], completions: list[str], lengths: list[int],
                      keep_samples: int = 5) -> EvalResult:
    """Metrics of completions against their problems (pure: no model involved)."""
    components = [reward_components(text, problem) for text, problem in zip(completions, problems)]

    def mean(name: str) -> float:
        return float(np.mean([c[name] for c in components])) if components else 0.0

    samples = [{"prompt": p.prompt, "completion": c, "correct": bool(s["correctness"])}
               for p, c, s in list(zip(problems, completions, components))[:keep_samples]]
    return EvalResult(
        num_problems=len(problems),
        accuracy=mean("correctness"),
        format_compliance=mean("format"),
        step_validity=mean("step_validity"),
        verification=mean("verification"),
        mean_completion_tokens=float(np.mean(lengths)) if lengths else 0.0,
        samples=samples,
    )


def evaluate(backend: Backend, problems: list[Problem], config: EvalConfig, label: str = "eval") -> EvalResult:
    tokenizer = backend.tokenizer
    completions, lengths = [], []
    with progress_bar(len(problems), label, unit="problem") as bar:
        for start in range(0, len(problems), config.batch_size):
            chunk = problems[start:start + config.batch_size]
            rows = backend.generate(encode_prompts(tokenizer, chunk), config.max_new_tokens, 0.0)
            completions += [decode_completion(tokenizer, row) for row in rows]
            lengths += [len(row) for row in rows]
            bar.update(len(chunk))
    return score_completions(problems, completions, lengths)


def results_table(results: dict[str, EvalResult]) -> str:
    """Markdown table of the stages evaluated, e.g. before SFT / after SFT / after GRPO."""
    lines = ["| stage | accuracy | format | step validity | verification | mean tokens |",
             "|---|---|---|---|---|---|"]
    for stage, result in results.items():
        lines.append(f"| {stage} | {result.accuracy:.1%} | {result.format_compliance:.1%} | "
                     f"{result.step_validity:.1%} | {result.verification:.1%} | "
                     f"{result.mean_completion_tokens:.0f} |")
    return "\n".join(lines)
