"""The SFT and GRPO loops, written once against the backend interface."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from shared.algorithms.grpo import group_advantages, rows_with_signal
from shared.algorithms.padding import pack_batch
from shared.algorithms.prompt_pool import PromptPool, informative_groups
from shared.models.prompts import Example, decode_completion, encode_examples, encode_prompts
from shared.runtime.distributed import gather_shards, shard
from shared.runtime.errors import DivergedError
from shared.runtime.progress import progress_bar
from shared.tasks.task import Reward, TaskProblem, combined_reward, reward_components, reward_weights
from shared.training.backend import Backend, GRPOBatch
from shared.training.config import GRPOConfig, SFTConfig
from shared.training.resume import phase_steps, step_seed

Log = Callable[[dict], None]


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, min_ratio: float = 1.0) -> float:
    """Linear warm-up to `peak`, then cosine decay to `peak * min_ratio` (min_ratio 1: constant)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def diverged(phase: str, step: int, found: str, lr_flag: str) -> DivergedError:
    return DivergedError(f"{phase} diverged at step {step} ({found}); nothing was saved from it and "
                         f"the checkpoints saved before it are intact: lower {lr_flag}")


def check_finite(backend: Backend, stats: dict, phase: str, step: int, lr_flag: str) -> None:
    """Stop at the first non-finite loss, gradient or weight, before anything is saved from the diverged weights."""
    bad = {name: stats[name] for name in ("loss", "grad_norm") if name in stats and not math.isfinite(stats[name])}
    if bad or not backend.weights_are_finite():
        raise diverged(phase, step, ", ".join(f"{name} {value}" for name, value in bad.items()) or
                       "weights not finite", lr_flag)


def shuffled_batches(count: int, batch_size: int, epochs: int, seed: int, skip: int = 0):
    """(step, epoch, indices) for each batch of each epoch, reshuffled every epoch, seeded; the
    first `skip` batches (a resumed run's finished steps) are drawn and passed over."""
    rng = np.random.default_rng(seed)
    batches = ((epoch, order[start:start + batch_size]) for epoch in range(epochs)
               for order in [rng.permutation(count)] for start in range(0, count, batch_size))
    for step, (epoch, indices) in enumerate(itertools.islice(batches, skip, None), start=skip + 1):
        yield step, epoch, indices


def train_sft(backend: Backend, problems: list[TaskProblem], config: SFTConfig, seed: int, log: Log,
              start_step: int = 0, examples: list[Example] | None = None) -> Iterator[int]:
    """Cross-entropy on the reference completions, yielding each finished step; a resumed run passes
    the steps it finished. `examples`: the problems already tokenized by this model's tokenizer."""
    tokenizer = backend.tokenizer
    examples = encode_examples(tokenizer, problems) if examples is None else examples
    total_steps = phase_steps(len(examples), config.batch_size, config.epochs)
    batches = shuffled_batches(len(examples), config.batch_size, config.epochs, seed, skip=start_step)
    with progress_bar(total_steps, "SFT", initial=start_step) as bar:
        for step, epoch, indices in batches:
            backend.seed(step_seed(seed, "sft", step))
            chosen = [examples[i] for i in shard(indices, backend.rank, backend.world_size)]
            batch = pack_batch([p for p, _ in chosen], [c for _, c in chosen], tokenizer.pad_token_id)
            lr = learning_rate(step - 1, total_steps, config.lr, config.warmup_steps, config.min_lr_ratio)
            began = time.perf_counter()
            total_tokens, tokens = summed(backend, int(batch.completion_mask.sum()), int(batch.attention_mask.sum()))
            stats = backend.sft_step(batch, lr, config, int(total_tokens))
            stats["loss"] = summed(backend, stats["loss"])[0]  # each process's part is over the step's tokens
            seconds = time.perf_counter() - began
            check_finite(backend, stats, "SFT", step, "--sft-lr")
            log({"phase": "sft", "step": step, "epoch": epoch, "lr": lr, **stats, "step_s": seconds,
                 "tokens_per_s": tokens / seconds, **peak_memory(backend), **processes(backend)})
            bar.set_postfix({"loss": f"{stats['loss']:.4f}", "tokens/s": f"{tokens / seconds:.0f}"})
            bar.update()
            yield step


def summed(backend: Backend, *values):
    """Each value summed over the processes of a data-parallel run (as it is, alone)."""
    if backend.world_size == 1:
        return list(values)
    return [float(v) for v in backend.all_sum(np.array(values, dtype=np.float64))]


def every_group(backend: Backend, rows: list, group_size: int) -> list:
    """Per-row values of this process's groups -> those of every process's groups, in the step's order."""
    groups = [rows[start:start + group_size] for start in range(0, len(rows), group_size)]
    return sum(gather_shards(groups, backend.rank, backend.world_size, backend.all_sum), [])


def peak_memory(backend: Backend) -> dict:
    """The most memory in use since the phase (or the evaluation within it) began."""
    return {"peak_memory_gb": backend.peak_memory() / 2**30}


def processes(backend: Backend) -> dict:
    """A data-parallel run says so in each step's record."""
    return {"processes": backend.world_size} if backend.world_size > 1 else {}


def decoding_stats(counts: dict) -> dict:
    """What speculative decoding did in a rollout that drafted: the fraction of drafted tokens accepted,
    and the tokens each row gained per forward of the model."""
    if not counts.get("drafted"):
        return {}
    return {"draft_acceptance": counts["accepted"] / counts["drafted"],
            "tokens_per_forward": 1 + counts["accepted"] / max(counts["row_forwards"], 1)}


def score_group(texts: list[str], problem: TaskProblem, rewards: dict[str, Reward]) -> tuple[list[float], list[dict]]:
    components = [reward_components(rewards, text, problem) for text in texts]
    weights = reward_weights(rewards)
    return [combined_reward(c, weights) for c in components], components


@dataclass
class Rollouts:
    """Groups of G sampled completions on this process, scored: per group its rewards; per row the prompt's and
    completion's tokens and the reward components."""
    scores: list[list[float]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)

    def select_groups(self, chosen: list[int], group_size: int) -> "Rollouts":
        rows = [g * group_size + i for g in chosen for i in range(group_size)]
        return Rollouts([self.scores[g] for g in chosen], [self.prompts[r] for r in rows],
                        [self.completions[r] for r in rows], [self.components[r] for r in rows])

    def extend(self, other: "Rollouts") -> None:
        for name in ("scores", "prompts", "completions", "components"):
            getattr(self, name).extend(getattr(other, name))


def roll_out(backend: Backend, problems: list[TaskProblem], indices: list[int], config: GRPOConfig,
             rewards: dict[str, Reward], step: int, seed: int) -> Rollouts:
    """G completions for each of this process's prompts (`indices`, already its shard), scored."""
    if not indices:
        return Rollouts()
    prompts = [ids for ids in encode_prompts(backend.tokenizer, [problems[i] for i in indices])
               for _ in range(config.group_size)]
    try:
        completions = backend.generate(prompts, config.max_new_tokens, config.temperature, seed=seed)
    except DivergedError as error:
        raise diverged("GRPO", step, str(error), "--grpo-lr") from None
    texts = [decode_completion(backend.tokenizer, c) for c in completions]
    rollouts = Rollouts(prompts=prompts, completions=completions)
    for number, index in enumerate(indices):
        group = texts[number * config.group_size:(number + 1) * config.group_size]
        scores, components = score_group(group, problems[index], rewards)
        rollouts.scores.append(scores)
        rollouts.components += components
    return rollouts


def uniform_rollouts(backend: Backend, problems: list[TaskProblem], indices: list[int], config: GRPOConfig,
                     rewards: dict[str, Reward], seed: int, step: int) -> tuple[Rollouts, Rollouts]:
    """The step's shuffled batch, every group in the loss: (sampled, trained) are the same rollouts."""
    mine = shard(indices, backend.rank, backend.world_size)  # whole groups
    rollouts = roll_out(backend, problems, mine, config, rewards, step,
                        seed=(seed * 100_003 + step - 1) * backend.world_size + backend.rank)
    return rollouts, rollouts


def teaching_rollouts(backend: Backend, problems: list[TaskProblem], pool: PromptPool, config: GRPOConfig,
                      rewards: dict[str, Reward], seed: int, step: int) -> tuple[Rollouts, Rollouts]:
    """Dynamic sampling (DAPO): draw prompts by pass rate, keep the groups whose rewards differ, and draw
    again until the step has --prompts-per-step of them or has sampled --rollout-budget times that many
    groups. Every process draws the same prompts (the pool is the same everywhere) and samples its share.
    Returns (every rollout sampled, the kept ones): the dropped groups count nowhere in the loss."""
    rng = np.random.default_rng(step_seed(seed, "grpo", step))
    budget = math.ceil(config.prompts_per_step * config.rollout_budget)
    sampled, kept = Rollouts(), Rollouts()
    drawn: set[int] = set()
    kept_groups = draw_round = 0
    while kept_groups < config.prompts_per_step and len(drawn) < budget:
        wanted = math.ceil((config.prompts_per_step - kept_groups) / pool.informative_share())
        indices = pool.draw(rng, min(max(wanted, backend.world_size), budget - len(drawn)), exclude=drawn)
        if not indices:
            break
        drawn.update(indices)
        mine = shard(indices, backend.rank, backend.world_size)
        rollouts = roll_out(backend, problems, mine, config, rewards, step,
                            seed=(step_seed(seed, "grpo", step) * 64 + draw_round) * backend.world_size + backend.rank)
        scores = gather_shards(rollouts.scores, backend.rank, backend.world_size, backend.all_sum)
        correct = every_group(backend, [bool(c["correctness"]) for c in rollouts.components], config.group_size)
        for number, index in enumerate(indices):
            pool.record(index, correct[number * config.group_size:(number + 1) * config.group_size])
        informative = set(informative_groups(np.array(scores)).tolist())
        pool.count_groups(len(indices), len(informative))
        mine_kept = [local for local, number in enumerate(range(len(indices))[backend.rank::backend.world_size])
                     if number in informative]
        sampled.extend(rollouts)
        kept.extend(rollouts.select_groups(mine_kept, config.group_size))
        kept_groups += len(informative)
        draw_round += 1
    return sampled, kept


def train_grpo(backend: Backend, problems: list[TaskProblem], config: GRPOConfig, seed: int, log: Log,
               start_step: int = 0, *, rewards: dict[str, Reward], pool: PromptPool | None = None) -> Iterator[int]:
    """Sample G completions per prompt, score them, and push toward the better ones of each group;
    yields each finished step. With a `pool` (--dynamic-sampling) the step's prompts are drawn by pass
    rate and only groups whose rewards differ are trained on."""
    tokenizer = backend.tokenizer
    total_steps = phase_steps(len(problems), config.prompts_per_step, config.epochs)
    steps_per_epoch = phase_steps(len(problems), config.prompts_per_step, 1)
    batches = shuffled_batches(len(problems), config.prompts_per_step, config.epochs, seed, skip=start_step) \
        if pool is None else ((step, (step - 1) // steps_per_epoch, None)
                              for step in range(start_step + 1, total_steps + 1))
    with progress_bar(total_steps, "GRPO", initial=start_step) as bar:
        for step, epoch, indices in batches:
            backend.seed(step_seed(seed, "grpo", step))
            began = time.perf_counter()
            sampled, kept = (uniform_rollouts(backend, problems, indices, config, rewards, seed, step) if pool is None
                             else teaching_rollouts(backend, problems, pool, config, rewards, seed, step))
            decoding = decoding_stats(backend.generation_stats)
            prompts, completions = kept.prompts, kept.completions
            advantages = group_advantages(np.array(kept.scores).reshape(-1, config.group_size),
                                          scale_by_std=config.loss_variant != "dr_grpo")
            advantages = advantages.ravel().astype(np.float32)
            trained = rows_with_signal(advantages, config.beta)
            rollout_seconds = time.perf_counter() - began
            lr = learning_rate(step - 1, total_steps, config.lr, config.warmup_steps, config.min_lr_ratio)
            # the loss's normalisers count every process's rows in the loss, so the summed gradients are the step's
            sequences, completion_tokens, trained_sequences = summed(
                backend, len(prompts), sum(len(c) for c in completions), len(trained))
            stats = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "grad_norm": 0.0}  # no signal: no update
            if trained_sequences:
                tokens = ref = old = None
                if len(trained):
                    tokens = pack_batch([prompts[i] for i in trained], [completions[i] for i in trained],
                                        tokenizer.pad_token_id)
                    ref = backend.completion_logprobs(tokens, config.temperature, reference=True) if config.beta \
                        else None
                    old = backend.completion_logprobs(tokens, config.temperature) if config.updates_per_batch > 1 \
                        else None
                batch = GRPOBatch(tokens, advantages[trained], old, ref, sampled_sequences=int(sequences),
                                  sampled_completion_tokens=int(completion_tokens))
                for _ in range(config.updates_per_batch):
                    stats = backend.grpo_step(batch, lr, config)
                    check_finite(backend, stats, "GRPO", step, "--grpo-lr")
                if backend.world_size > 1:  # loss adds up over processes; the token fractions are averaged
                    loss, clipped, kl = summed(backend, stats["loss"], stats["clip_fraction"], stats["kl"])
                    stats.update(loss=loss, clip_fraction=clipped / backend.world_size, kl=kl / backend.world_size)
            scores = gather_shards(sampled.scores, backend.rank, backend.world_size, backend.all_sum)
            components = every_group(backend, sampled.components, config.group_size)
            lengths = every_group(backend, [len(c) for c in sampled.completions], config.group_size)
            means = {f"reward_{name}": float(np.mean([c[name] for c in components])) for name in rewards}
            tokens_per_s = summed(backend, sum(len(p) + len(c) for p, c in zip(sampled.prompts, sampled.completions))
                                  )[0] / (time.perf_counter() - began)
            log({"phase": "grpo", "step": step, "epoch": epoch, "lr": lr, **stats,
                 "reward": float(np.mean(scores)), **means, **sampling_stats(scores, pool, config.group_size),
                 "completion_tokens": float(np.mean(lengths)),
                 "trained_sequences": int(trained_sequences), "rollout_s": rollout_seconds, **decoding,
                 "step_s": time.perf_counter() - began, "tokens_per_s": tokens_per_s, **peak_memory(backend),
                 **processes(backend)})
            bar.set_postfix({"reward": f"{np.mean(scores):.3f}", "correct": f"{means['reward_correctness']:.2f}",
                             "tokens/s": f"{tokens_per_s:.0f}"})
            bar.update()
            yield step


def sampling_stats(scores: list[list[float]], pool: PromptPool | None, group_size: int) -> dict:
    """What a step's rollouts were worth: groups sampled, those whose rewards differed (the informative ones,
    the only ones with an advantage), and with dynamic sampling the completions spent per group kept."""
    informative = len(informative_groups(np.array(scores)))
    stats = {"sampled_groups": len(scores), "informative_groups": informative}
    if pool is not None:
        stats.update(rollouts_per_kept_group=len(scores) * group_size / informative if informative else None,
                     **pool.summary())
    return stats
