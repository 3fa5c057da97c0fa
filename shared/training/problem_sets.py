"""The problems a run uses, drawn once, and fitted to its longest sequence (--max-seq-len) before any work:
a problem that does not fit is an error naming it, or with --truncate its prompt is cut from the left."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shared.models.prompts import Example, encode_examples, encode_prompts, load_tokenizer
from shared.runtime.errors import UsageError
from shared.runtime.memory import check_training_fits
from shared.tasks.task import Task, TaskProblem
from shared.training.config import RunConfig
from shared.training.evaluation import extra_sets

logger = logging.getLogger("local_reasoning")


@dataclass(frozen=True)
class CutProblem:
    """A problem whose prompt was cut from the left to fit; everything else (answer, fields, where) is its own."""
    original: Any
    prompt: str

    def __getattr__(self, name: str):
        return getattr(self.original, name)


@dataclass
class ProblemSets:
    sft: list[TaskProblem]
    grpo: list[TaskProblem]
    held_out: list[TaskProblem]
    extra: dict[str, list[TaskProblem]]
    longest: dict[str, int] = field(default_factory=dict)  # "sft", "grpo": the longest sequence a step trains on
    sft_examples: list[Example] | None = None  # (prompt ids, target ids) of each SFT problem, as the length check saw


def draw_problem_sets(task: Task, config: RunConfig) -> ProblemSets:
    """Every problem the run's phases and evaluations take, in the order they take them."""
    trains_sft, trains_grpo = config.mode in ("sft", "full"), config.mode in ("grpo", "full")
    return ProblemSets(
        sft=task.training_problems(config.sft.num_samples, config.seed, for_sft=True) if trains_sft else [],
        grpo=task.training_problems(config.grpo.num_prompts, config.seed + 1, for_sft=False) if trains_grpo else [],
        held_out=task.held_out(config.eval.num_problems, config.seed),
        extra=extra_sets(task, config.eval.ood_problems, config.seed))


def run_problem_sets(task: Task, config: RunConfig, model_folder: Path, dims: dict | None) -> ProblemSets:
    """The run's problems, fitted to --max-seq-len, else to the positions the model's config (`dims`) allows."""
    sets, limit = draw_problem_sets(task, config), sequence_limit(config.max_seq_len, dims)
    if limit is None:
        return sets
    return fit_problem_sets(load_tokenizer(model_folder, config.model.trust_remote_code), sets, config, limit)


@dataclass(frozen=True)
class SequenceLimit:
    tokens: int
    given: bool  # --max-seq-len, else the model's positions

    def __str__(self) -> str:
        return f"--max-seq-len {self.tokens:,}" if self.given else f"the model's {self.tokens:,} positions"


def sequence_limit(max_seq_len: int | None, dims: dict | None) -> SequenceLimit | None:
    """--max-seq-len, else the positions of the model's config.json (`dims`: model_dimensions' reading)."""
    positions = (dims or {}).get("max_position_embeddings")
    return SequenceLimit(max_seq_len or positions, given=bool(max_seq_len)) if max_seq_len or positions else None


def fit_evaluation_sets(tokenizer: Any, sets: dict[str, list[TaskProblem]], max_new_tokens: int,
                        limit: SequenceLimit | None, truncate: bool) -> dict[str, list[TaskProblem]]:
    """`eval`'s problem sets fitted to `limit` with room for `max_new_tokens`."""
    room = ("--max-new-tokens", max_new_tokens)
    return {name: fit_problems(tokenizer, problems, f"evaluation ({name.replace('_', ' ')})", room, limit,
                               truncate)[0] for name, problems in sets.items()} if limit else sets


def fit_problem_sets(tokenizer: Any, sets: ProblemSets, config: RunConfig, limit: SequenceLimit) -> ProblemSets:
    """Each set fitted to `limit`: SFT's prompt + target, GRPO's and evaluation's prompt + the tokens they
    may generate. One line naming the first problem that does not fit, unless config.truncate."""
    fit = {"truncate": config.truncate, "limit": limit}
    examples = encode_examples(tokenizer, sets.sft)  # SFT trains on these ids: tokenized once
    sft, longest_sft = fit_problems(tokenizer, sets.sft, "SFT", room=None, examples=examples, **fit)
    examples = [pair if kept is problem else encode_examples(tokenizer, [kept])[0]
                for pair, problem, kept in zip(examples, sets.sft, sft)]
    grpo, longest_grpo = fit_problems(tokenizer, sets.grpo, "GRPO", ("--max-new-tokens", config.grpo.max_new_tokens),
                                      **fit)
    evaluation = fit_evaluation_sets(tokenizer, {"held_out": sets.held_out, **sets.extra}, config.eval.max_new_tokens,
                                     limit, config.truncate)
    return ProblemSets(sft, grpo, evaluation.pop("held_out"), evaluation, {"sft": longest_sft, "grpo": longest_grpo},
                       examples)


def fit_problems(tokenizer: Any, problems: list[TaskProblem], use: str, room: tuple[str, int] | None,
                 limit: SequenceLimit, truncate: bool, examples: list[Example] | None = None
                 ) -> tuple[list[TaskProblem], int]:
    """(`problems` whose prompt and completion fit in `limit`, the longest of them in tokens). `room`: (flag,
    tokens) generation may take after the prompt; None: the SFT target's own length. `examples`: the problems
    already tokenized (encode_examples)."""
    if not problems:
        return problems, 0
    if room:
        prompts, completions = [len(ids) for ids in encode_prompts(tokenizer, problems)], [room[1]] * len(problems)
    else:
        examples = examples or encode_examples(tokenizer, problems)
        prompts, completions = [len(p) for p, _ in examples], [len(t) for _, t in examples]
    too_long = [i for i, (p, c) in enumerate(zip(prompts, completions)) if p + c > limit.tokens]
    if not too_long:
        return problems, max(p + c for p, c in zip(prompts, completions))
    if room and max(prompts) < limit.tokens and not truncate:  # every prompt fits: the room asked for does not
        raise UsageError(f"{room[0]} {room[1]} runs past {limit} for {use} (prompts take up to {max(prompts):,}): "
                         f"at most {limit.tokens - max(prompts):,}")
    first = too_long[0]
    what = (f"{prompts[first] + completions[first]:,} tokens (prompt {prompts[first]:,} + "
            f"{f'{room[0]} {room[1]}' if room else f'completion {completions[first]:,}'})")
    if not truncate:
        more = f"; {len(too_long) - 1:,} more {use} problems too" if len(too_long) > 1 else ""
        raise UsageError(f"{problems[first].where()} is {what}, more than {limit} for {use}{more}: "
                         "--truncate cuts prompts from the left to fit")
    fitted = list(problems)
    for i in too_long:
        fitted[i] = cut_prompt(tokenizer, problems[i], limit, completions[i], use, room)
    logger.warning("--truncate: %s of %s %s problems had their prompts cut from the left to fit %s (the longest "
                   "was %s tokens)", f"{len(too_long):,}", f"{len(problems):,}", use, limit,
                   f"{max(prompts[i] + completions[i] for i in too_long):,}")
    return fitted, limit.tokens


def cut_prompt(tokenizer: Any, problem: TaskProblem, limit: SequenceLimit, completion: int, use: str,
               room: tuple[str, int] | None) -> CutProblem:
    """The problem with the end of its prompt that fits in `limit` beside `completion` tokens, chat template
    included."""
    budget = limit.tokens - completion
    content = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    template = len(encode_prompts(tokenizer, [problem])[0]) - len(content)
    keep = budget - template
    for _ in range(4):  # a cut can re-tokenize a token or two longer at its new edge
        if keep < 1:
            needs = f"{room[0]} {room[1]}" if room else "its completion"
            raise UsageError(f"{problem.where()}: {needs} alone leaves no room for the prompt in {limit} for {use}; "
                             "raise --max-seq-len")
        cut = CutProblem(problem, tokenizer.decode(content[-keep:]))
        over = len(encode_prompts(tokenizer, [cut])[0]) - budget
        if over <= 0:
            return cut
        keep -= over
    raise UsageError(f"{problem.where()}: its prompt could not be cut to fit {limit} for {use}")


def check_memory(config: RunConfig, sets: ProblemSets, dims: dict | None,
                 sequences_per_pass: Callable[[int, int], int], available: int | None) -> None:
    """Each training step's estimated peak against the memory free, before any work: one line naming the flags
    that would fit (the estimate: shared.runtime.memory.training_step_bytes)."""
    dims = dims or {}
    if not {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"} <= set(dims):
        return
    batches = {"SFT": (config.sft.batch_size, sets.longest.get("sft", 0)),
               "GRPO": (config.grpo.prompts_per_step * config.grpo.group_size, sets.longest.get("grpo", 0))}
    steps = {phase: (min(max(1, rows // config.processes), sequences_per_pass(tokens, dims["vocab_size"])), tokens)
             for phase, (rows, tokens) in batches.items() if tokens}
    check_training_fits(dims, config.model.finetune == "full", config.model.gradient_checkpointing, steps, available)
