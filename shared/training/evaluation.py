"""Evaluation on held-out problems, in and out of distribution: accuracy, format, each reward component,
completion length, and pass@k with sampling."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np

from shared.models.prompts import decode_completion, encode_prompts
from shared.runtime.distributed import gather_shards, shard
from shared.runtime.progress import progress_bar
from shared.tasks.task import (Reward, Task, TaskProblem, combined_reward, final_answer, is_correct, reward_components,
                               reward_weights, typed_problems)
from shared.training.backend import Backend
from shared.training.config import EvalConfig


@dataclass
class EvalResult:
    num_problems: int
    accuracy: float
    format_compliance: float
    mean_completion_tokens: float
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    pass_at_k: float | None = None  # with k samples per problem: at least one right
    k: int | None = None
    mean_at_k: float | None = None  # the share of the k samples right, averaged over problems
    maj_at_k: float | None = None  # the samples' most frequent final answer right
    temperature: float | None = None  # of the k samples
    samples: list[dict] = field(default_factory=list)
    solved: str = ""  # per problem, in order: "1" answered correctly, "0" not

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("samples", "solved")}


def score_completions(rewards: dict[str, Reward], problems: list[TaskProblem], completions: list[str],
                      lengths: list[int], keep_samples: int = 5) -> EvalResult:
    """Metrics of completions against their problems (pure: no model involved)."""
    components = [reward_components(rewards, text, problem) for text, problem in zip(completions, problems)]

    def mean(name: str) -> float:
        return float(np.mean([c[name] for c in components])) if components else 0.0

    samples = [{"prompt": p.prompt, "completion": c, "correct": bool(s["correctness"])}
               for p, c, s in list(zip(problems, completions, components))[:keep_samples]]
    weights = reward_weights(rewards)
    return EvalResult(
        num_problems=len(problems),
        accuracy=mean("correctness"),
        format_compliance=mean("format") if "format" in rewards else 0.0,
        mean_completion_tokens=float(np.mean(lengths)) if lengths else 0.0,
        reward=float(np.mean([combined_reward(c, weights) for c in components])) if components else 0.0,
        reward_components={name: mean(name) for name in rewards},
        samples=samples,
        solved="".join("1" if c["correctness"] else "0" for c in components),
    )


def paired_comparison(before: str, after: str) -> dict:
    """Two evaluations of the same problems (`solved` strings): the accuracy difference, the problems
    only one of them solved each way, and McNemar's exact two-sided p-value for "no difference"."""
    if len(before) != len(after) or not before:
        raise ValueError(f"a paired comparison needs the same problems; got {len(before)} and {len(after)}")
    gained = sum(b == "0" and a == "1" for b, a in zip(before, after))
    lost = sum(b == "1" and a == "0" for b, a in zip(before, after))
    return {"problems": len(before), "difference": (gained - lost) / len(before), "gained": gained, "lost": lost,
            "p_value": mcnemar_p_value(gained, lost)}


def mcnemar_p_value(gained: int, lost: int) -> float:
    """Exact McNemar test: under no difference each discordant problem goes either way with
    probability 1/2, so the smaller count is binomial(gained + lost, 1/2); two-sided."""
    discordant = gained + lost
    tail = sum(math.comb(discordant, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2 ** discordant)


def paired_line(comparison: dict, before: str, after: str) -> str:
    """'after GRPO vs after SFT on the same N problems: +D points (solved only ...), McNemar p = P'."""
    return (f"{after} vs {before} on the same {comparison['problems']:,} problems: "
            f"{100 * comparison['difference']:+.1f} points (solved only {after}: {comparison['gained']}, "
            f"only {before}: {comparison['lost']}), McNemar p = {comparison['p_value']:.2g}")


def pass_at_k(rewards: dict[str, Reward], problems: list[TaskProblem], completions: list[list[str]]) -> float:
    """Fraction of problems with at least one correct answer among their k samples (n = k, so exact)."""
    return sampled_accuracies(rewards, problems, completions)["pass_at_k"]


def sampled_accuracies(rewards: dict[str, Reward], problems: list[TaskProblem], completions: list[list[str]]
                       ) -> dict[str, float]:
    """k sampled completions per problem -> mean@k (the share right), maj@k (the most frequent final answer
    right; ties go to the answer given first; completions without one do not vote) and pass@k (any right).
    Where greedy stands below maj@k, GRPO has answers the model already samples to make its first choice."""
    mean, majority, any_right = [], [], []
    for problem, texts in zip(problems, completions):
        right = [is_correct(rewards, text, problem) for text in texts]
        votes = Counter(answer for text in texts if (answer := final_answer(text)))
        top = votes.most_common(1)[0][0] if votes else None
        mean.append(float(np.mean(right)))
        majority.append(any(r for text, r in zip(texts, right) if top is not None and final_answer(text) == top))
        any_right.append(any(right))
    return {name: float(np.mean(values)) if values else 0.0
            for name, values in (("mean_at_k", mean), ("maj_at_k", majority), ("pass_at_k", any_right))}


def complete(backend: Backend, problems: list[TaskProblem], config: EvalConfig, label: str, temperature: float = 0.0,
             seed: int | None = None) -> tuple[list[str], list[int]]:
    """One completion per problem, in batches: texts and token counts. In a data-parallel run each
    process completes its share and every process gets them all."""
    tokenizer, rank, world_size = backend.tokenizer, backend.rank, backend.world_size
    mine = shard(problems, rank, world_size)
    completions, lengths = [], []
    with progress_bar(len(mine), label, unit="problem") as bar:
        for start in range(0, len(mine), config.batch_size):
            chunk = mine[start:start + config.batch_size]
            rows = backend.generate(encode_prompts(tokenizer, chunk), config.max_new_tokens, temperature,
                                    seed=None if seed is None else (seed + start) * world_size + rank)
            completions += [decode_completion(tokenizer, row) for row in rows]
            lengths += [len(row) for row in rows]
            bar.update(len(chunk))
    return (gather_shards(completions, rank, world_size, backend.all_sum),
            gather_shards(lengths, rank, world_size, backend.all_sum))


def evaluate(backend: Backend, rewards: dict[str, Reward], problems: list[TaskProblem], config: EvalConfig,
             label: str = "eval") -> EvalResult:
    """Greedy metrics; with config.samples_per_problem = k > 1, also mean@k, maj@k and pass@k at
    config.temperature."""
    result = score_completions(rewards, problems, *complete(backend, problems, config, label))
    k = config.samples_per_problem
    if k > 1:
        repeated = [p for p in problems for _ in range(k)]
        texts, _ = complete(backend, repeated, config, f"{label} {k} samples", config.temperature, seed=config.seed)
        for name, value in sampled_accuracies(rewards, problems, [texts[i * k:(i + 1) * k]
                                                                  for i in range(len(problems))]).items():
            setattr(result, name, value)
        result.k, result.temperature = k, config.temperature
    return result


def extra_sets(task: Task, count: int, seed: int) -> dict[str, list[TaskProblem]]:
    """The task's evaluation sets beyond the held-out one (addition: 2 or 4 operands, 3-digit operands)."""
    return {name: task.extra_set(name, count, seed) for name in task.extra_sets} if count else {}


def sampled_line(name: str, result: EvalResult) -> str:
    """'in distribution, 200 problems: greedy 81.0%, mean@8 77.3%, maj@8 84.5%, pass@8 95.0% (temperature 1)'."""
    k = result.k
    return (f"{name.replace('_', ' ')}, {result.num_problems:,} problems: greedy {result.accuracy:.1%}, "
            f"mean@{k} {result.mean_at_k:.1%}, maj@{k} {result.maj_at_k:.1%}, pass@{k} {result.pass_at_k:.1%} "
            f"(temperature {result.temperature:g})")


def results_table(results: dict[str, EvalResult], first_column: str = "stage") -> str:
    """Markdown table, a row per stage (before SFT / after SFT / after GRPO) or per problem set
    (`two_operands` shows as "two operands"): accuracy, format, the task's other rewards, the combined reward."""
    with_pass = any(r.pass_at_k is not None for r in results.values())
    components = next(iter(results.values())).reward_components if results else {}
    others = [name for name in components if name not in ("correctness", "format")]
    header = f"| {first_column} | accuracy | format | " + "".join(f"{n.replace('_', ' ')} | " for n in others)
    header += "reward | mean tokens |" + (" mean@k | maj@k | pass@k |" if with_pass else "")
    lines = [header, "|---" * (5 + len(others) + 3 * with_pass) + "|"]
    for stage, result in results.items():
        line = (f"| {stage.replace('_', ' ')} | {result.accuracy:.1%} | {result.format_compliance:.1%} | "
                + "".join(f"{result.reward_components.get(n, 0.0):.1%} | " for n in others)
                + f"{result.reward:.2f} | {result.mean_completion_tokens:.0f} |")
        if with_pass:
            line += (" |" * 3 if result.pass_at_k is None else
                     "".join(f" {value:.1%} (k={result.k}) |" if value is not None else " |"
                             for value in (result.mean_at_k, result.maj_at_k, result.pass_at_k)))
        lines.append(line)
    return "\n".join(lines)


def add_comparisons(payload: dict, results: dict[str, EvalResult], baseline: dict[str, EvalResult], checkpoint: str,
                    other: str) -> str:
    """`eval --compare`: each problem set's paired difference of `checkpoint` against `other`, written into
    `payload` (the --json content) beside the other's results; the lines to print."""
    lines = []
    for name, result in results.items():
        paired = paired_comparison(baseline[name].solved, result.solved)
        lines.append(f"{name.replace('_', ' ')}: " + paired_line(paired, other, checkpoint))
        payload[name]["compared_with"] = {"checkpoint": other, **baseline[name].summary(),
                                          "solved": baseline[name].solved, "paired": paired}
    return "\n".join(lines)


def infer_report(rewards: dict[str, Reward], problems: list[TaskProblem], completions: list[str], scored: bool
                 ) -> str:
    """What `infer` prints: each problem with its reasoning, or (scored) a line per problem and the accuracy."""
    if not scored:
        return "\n".join(f"Problem: {p.prompt}\n\n{c}\n" for p, c in zip(problems, completions))
    correct = [is_correct(rewards, c, p) for p, c in zip(problems, completions)]
    lines = [f"{p.prompt} = {p.answer}: got {final_answer(c)} {'✓' if right else '✗'}"
             for p, c, right in zip(problems, completions, correct)]
    return "\n".join(lines + [f"accuracy: {sum(correct)}/{len(problems)} = {sum(correct) / len(problems):.1%}"])


def infer_output(model: Backend, task: Task, typed: Iterable[str] | None, scored: int) -> Iterator[str]:
    """What `infer` prints, piece by piece (greedy): answers to problems as they are typed (`typed`: lines of
    input), else the task's demo problems, or `scored` held-out ones with their scores."""
    settings = EvalConfig(max_new_tokens=max(256, task.completion_tokens))
    if typed is not None:
        yield task.typing_hint
        for problem in typed_problems(typed, task):
            yield problem if isinstance(problem, str) else complete(model, [problem], settings, label="infer")[0][0]
        return
    problems = task.held_out(scored, 7) if scored else task.demo_problems()
    completions = complete(model, problems, settings, label="infer")[0]
    yield infer_report(task.rewards, problems, completions, scored=bool(scored))
