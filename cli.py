"""local-reasoning: teach a small language model to reason step by step (SFT, then GRPO).

This file declares the commands, maps their flags and prints; the work happens in shared/ and the backends.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from shared.algorithms.grpo import LOSS_VARIANTS
from shared.checkpoints.folders import check_can_write, hold_output, resource_error
from shared.runtime.distributed import launched_processes
from shared.runtime.errors import Interrupted, UserError
from shared.runtime.progress import setup_logging
from shared.training.config import EvalConfig

logger = logging.getLogger("local_reasoning")
POSITIVE_INT = click.IntRange(min=1)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Teach a small language model to reason step by step: SFT, then GRPO."""


MAX_SEQ_LEN = click.option("--max-seq-len", type=POSITIVE_INT, help="longest prompt + completion in tokens: a "
                           "problem beyond it is an error before any work [the model's positions]")
TRUNCATE = click.option("--truncate", is_flag=True, help="cut prompts beyond --max-seq-len from the left instead")
TRAIN_OPTIONS = [
    click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), default="auto", show_default=True,
                 help="auto: MLX on Apple Silicon, PyTorch on NVIDIA, else the faster on CPU"),
    click.option("--model", "model_name",
                 help="'tiny' (embedded, offline), 'smollm2' (pretrained, offline), a hub id or a local folder "
                 "[Qwen/Qwen2.5-0.5B; mode grpo: the --sft-checkpoint's]"),
    click.option("--seed", type=int, default=42, show_default=True),
    click.option("--task", help="'addition', 'countdown' or a JSONL file (docs/tasks.md) [addition; mode grpo: the "
                 "--sft-checkpoint's]"),
    click.option("--reward-file", type=click.Path(path_type=Path),
                 help="a Python file defining REWARDS = {name: (function, weight)}, added to the task's"),
    click.option("--sft-epochs", type=POSITIVE_INT, help="[preset]"),
    click.option("--sft-batch-size", type=POSITIVE_INT, help="[preset]"),
    click.option("--sft-lr", type=POSITIVE_FLOAT, help="peak learning rate [preset]"),
    click.option("--grpo-epochs", type=POSITIVE_INT, help="[preset]"),
    click.option("--grpo-samples", type=POSITIVE_INT, help="GRPO training prompts [preset]"),
    click.option("--grpo-lr", type=POSITIVE_FLOAT, help="[preset]"),
    click.option("--grpo-warmup-steps", type=click.IntRange(min=0), help="linear warm-up of the GRPO lr [preset]"),
    click.option("--group-size", type=click.IntRange(min=2), help="completions per prompt, G [preset]"),
    click.option("--prompts-per-step", type=POSITIVE_INT, help="prompts per GRPO step [preset]"),
    click.option("--temperature", type=POSITIVE_FLOAT, help="rollout temperature [preset]"),
    click.option("--loss-variant", type=click.Choice(LOSS_VARIANTS), help="GRPO loss aggregation [grpo]"),
    click.option("--dynamic-sampling/--no-dynamic-sampling", default=None,
                 help="draw GRPO prompts by pass rate, train only on groups whose rewards differ [preset]"),
    click.option("--rollout-budget", type=POSITIVE_FLOAT, help="most groups sampled per step with dynamic "
                 "sampling, times --prompts-per-step [3]"),
    click.option("--updates-per-batch", type=POSITIVE_INT, help="optimiser steps per batch of rollouts [1]"),
    click.option("--beta", type=click.FloatRange(min=0), help="KL penalty to the reference policy [0]"),
    click.option("--epsilon", type=POSITIVE_FLOAT, help="ratio clip range [0.2]"),
    click.option("--finetune", type=click.Choice(["lora", "full"]), help="[lora; full for tiny]"),
    click.option("--lora-rank", type=POSITIVE_INT, help="[16]"),
    click.option("--lora-alpha", type=POSITIVE_FLOAT, help="[32]"),
    click.option("--eval-samples", type=POSITIVE_INT, help="held-out problems per evaluation [preset]"),
    click.option("--eval-every", type=click.IntRange(min=0),
                 help="also evaluate every N steps of each phase [0: off; tiny: 250]"),
    click.option("--eval-every-samples", type=POSITIVE_INT,
                 help="held-out problems per evaluation along the run and before SFT [200]"),
    click.option("--headroom-samples", type=click.IntRange(min=0), help="before GRPO, sample the SFT model k times "
                 "per problem: mean@k, maj@k, pass@k [preset; 0: off]"),
    click.option("--ood-samples", type=click.IntRange(min=0),
                 help="problems per out-of-distribution set, evaluated after the last phase [200; 0: off]"),
    click.option("--save-every", type=click.IntRange(min=0),
                 help="save a checkpoint to resume from every N steps of each phase [SFT 200, GRPO 20; 0: off]"),
    click.option("--export-gguf", type=click.Choice(["f16", "bf16", "f32", "q8_0"]), is_flag=False, flag_value="f16",
                 help="at the end, write reasoning_final.gguf (--mode sft: sft_final.gguf) and an Ollama Modelfile "
                      "into --output-dir [alone: f16]"),
    click.option("--micro-batch-size", type=POSITIVE_INT, help="sequences per forward pass (gradients accumulate)"),
    MAX_SEQ_LEN, TRUNCATE,
    click.option("--gradient-checkpointing", is_flag=True, help="recompute activations in the backward pass: "
                 "less memory, more time"),
    click.option("--wandb-project", help="log to this Weights & Biases project"),
    click.option("--no-wandb", is_flag=True, help="never log to W&B"),
    click.option("--trust-remote-code", is_flag=True, help="let a hub model run its own code"),
    click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO",
                 show_default=True),
]


def with_train_options(command):
    for option in reversed(TRAIN_OPTIONS):
        command = option(command)
    return command


@cli.command()
@click.option("--mode", type=click.Choice(["sft", "grpo", "full"]), default="full", show_default=True)
@click.option("--num-samples", type=POSITIVE_INT, help="SFT training problems [preset]")
@click.option("--sft-checkpoint", type=click.Path(path_type=Path), help="start GRPO from this (mode grpo)")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("./output"), show_default=True)
@click.option("--resume", is_flag=True, help="continue the unfinished run in --output-dir from its last checkpoint")
@with_train_options
def train(**options) -> None:
    """Train: SFT teaches the format, GRPO rewards correct reasoning.

    Interrupted runs (Ctrl-C, a crash, kill -9) continue with --resume, or by running the same
    command again."""
    from shared.pipeline import results_text, run_training
    from shared.training.resume import run_to_start
    from backends import make_backend

    setup_logging(options["log_level"])
    check_can_write(options["output_dir"], "--output-dir", folder=True)
    with hold_output(options["output_dir"]):  # before reading what a run there left
        config, point = run_to_start(options, flags_given())
        backend = make_backend(config.backend, options["micro_batch_size"])
        if backend.rank:  # one process of a data-parallel run logs the progress
            logger.setLevel(logging.WARNING)
        results, out_of_distribution = run_training(config, backend, point)
        backend.close()
    if backend.rank:  # one process of a data-parallel run reports
        return
    click.echo(results_text(results, out_of_distribution))
    click.echo(f"checkpoints, metrics.jsonl, eval.json and report.md (with plots/) are in {config.output_dir}")


def flags_given() -> dict[str, str]:
    """The current command's options typed on the command line, each with its flag."""
    context = click.get_current_context()
    return {param.name: param.opts[0] for param in context.command.params
            if context.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE}


@cli.command()
@click.option("--num-samples", "counts", required=True, help="SFT problem counts, comma-separated: 100,500,1000")
@click.option("--mode", type=click.Choice(["sft", "full"]), default="full", show_default=True,
              help="full: each run is SFT then GRPO; sft: SFT only")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("./output/sweep"), show_default=True)
@with_train_options
def sweep(counts: str, **options) -> None:
    """Rerun the pipeline per SFT sample count: the accuracy-vs-data table (sweep.md) and plot (sweep.png).

    The same command again continues an interrupted sweep; finished rows are read back."""
    from shared.models.hardware import resolve_backend
    from shared.sweep import parse_counts, run_sweep, sweep_table
    from shared.training.config import run_config_from_options
    from backends import make_backend

    setup_logging(options["log_level"])
    check_can_write(options["output_dir"], "--output-dir", folder=True)
    numbers = parse_counts(counts)
    run_config_from_options({**options, "num_samples": numbers[-1], "sft_checkpoint": None})  # the largest fits
    config = run_config_from_options({**options, "num_samples": numbers[0], "sft_checkpoint": None})
    config.backend = resolve_backend(config.backend)  # a missing backend fails here, before any run
    with hold_output(config.output_dir):
        rows = run_sweep(config, numbers, lambda: make_backend(config.backend, options["micro_batch_size"]))
    click.echo(sweep_table(rows))
    click.echo(f"sweep.md, sweep.json, sweep.png and one folder per run are in {config.output_dir}")


TASK = click.option("--task", "task_name", help="'addition', 'countdown' or a JSONL file [the checkpoint's]")
CHECKPOINT = click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
                          help="a checkpoint folder, e.g. output/reasoning_final")
BACKEND = click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), default="auto", show_default=True)


@cli.command()
@CHECKPOINT
@BACKEND
@click.option("--interactive", is_flag=True, help="type problems, read the reasoning")
@click.option("--batch", is_flag=True, help="score N held-out problems and print a summary")
@click.option("--num-samples", type=POSITIVE_INT, default=50, show_default=True, help="problems for --batch")
@TASK
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="WARNING")
def infer(checkpoint: Path, backend: str, interactive: bool, batch: bool, num_samples: int, task_name: str | None,
          log_level: str) -> None:
    """Run a checkpoint: demo (default), --interactive, or --batch."""
    from shared.tasks.registry import checkpoint_task
    from shared.training.evaluation import infer_output
    from backends import load_for_inference

    setup_logging(log_level)
    if interactive and batch:
        raise click.UsageError("choose one of --interactive and --batch")
    task = checkpoint_task(checkpoint, task_name, None, checkpoint_rewards=False)
    if batch:
        task.check_count("--num-samples", num_samples, "held_out")
    model = load_for_inference(checkpoint, backend)
    for text in infer_output(model, task, sys.stdin if interactive else None, num_samples if batch else 0):
        click.echo(text)


@cli.command("eval")
@CHECKPOINT
@BACKEND
@click.option("--num-samples", type=POSITIVE_INT, default=200, show_default=True,
              help="held-out problems of the training shape")
@click.option("--ood-samples", type=click.IntRange(min=0), default=200, show_default=True,
              help="problems per extra set: addition's 2 operands, 4 operands, 3-digit operands; a file's other "
              "splits (0: skip)")
@click.option("--samples", "--samples-per-problem", "samples_per_problem", type=POSITIVE_INT, default=1,
              show_default=True, help="k > 1 also samples k completions per problem: mean@k, maj@k, pass@k")
@click.option("--temperature", type=POSITIVE_FLOAT, default=1.0, show_default=True, help="of the k samples")
@click.option("--max-new-tokens", type=POSITIVE_INT, default=256, show_default=True)
@MAX_SEQ_LEN
@TRUNCATE
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
@click.option("--compare", type=click.Path(path_type=Path),
              help="another checkpoint, scored on the same problems: the paired difference and McNemar's p")
@TASK
@click.option("--reward-file", type=click.Path(path_type=Path), help="rewards to add to the task's [the checkpoint's]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="WARNING")
def eval_command(checkpoint: Path, backend: str, num_samples: int, ood_samples: int, samples_per_problem: int,
                 temperature: float, max_new_tokens: int, max_seq_len: int | None, truncate: bool, seed: int,
                 json_path: Path | None, compare: Path | None, task_name: str | None, reward_file: Path | None,
                 log_level: str) -> None:
    """Score a checkpoint on held-out problems and the task's extra sets (greedy; --samples K adds mean@K,
    maj@K and pass@K)."""
    from shared.tasks.registry import checkpoint_task
    from shared.training.checkpoint_eval import CheckpointEval, evaluate_checkpoint
    from backends import load_for_inference

    setup_logging(log_level)
    settings = EvalConfig(num_problems=num_samples, max_new_tokens=max_new_tokens,
                          samples_per_problem=samples_per_problem, temperature=temperature, seed=seed)
    request = CheckpointEval(checkpoint, checkpoint_task(checkpoint, task_name, reward_file), settings, ood_samples,
                             max_seq_len, truncate, compare)
    request.check()
    if json_path:
        check_can_write(json_path, "--json", folder=False)
    payload = evaluate_checkpoint(request, lambda path: load_for_inference(path, backend),
                                  lambda text: click.echo(text, nl=False))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))  # a folder, or a .gguf file
@click.option("--to", "target", type=click.Choice(["torch", "mlx", "gguf"]), required=True,
              help="torch: transformers / PEFT layout; mlx: mlx-lm layout; gguf: one file for llama.cpp, Ollama, "
                   "LM Studio (adapters merged), with an Ollama Modelfile beside it")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="a new folder (gguf: a new .gguf file)")
@click.option("--from", "source", type=click.Choice(["torch", "mlx"]),
              help="the library that wrote CHECKPOINT, where its layout does not tell (a full model folder)")
@click.option("--merge", is_flag=True, help="fuse a LoRA adapter into the base: a full model folder")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "f32", "f16", "bf16", "q8_0"]),
              help="cast the weights; gguf: f16 (default), bf16, f32 or q8_0 (8-bit, about half of f16)")
@click.option("--base", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="an adapter's base model, where it is not at the path the adapter names")
def convert(checkpoint: Path, target: str, output: Path, source: str | None, merge: bool, dtype: str | None,
            base: Path | None) -> None:
    """Convert a checkpoint to the other backend's native layout (full weights or LoRA adapter), write it
    as a GGUF file, or import a GGUF file (llama.cpp's format) as a model folder both backends load."""
    from shared.models.convert import convert as convert_to

    click.echo(convert_to(checkpoint, target, output, source, merge, dtype, base))


def main() -> int:
    # a data-parallel run's processes each say which one they are
    who = f"rank {os.environ.get('RANK', '?')}: " if launched_processes() > 1 else ""
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as error:  # bad flags and values: one line, exit 2
        click.echo(f"error: {who}{error.format_message()}", err=True)
        return error.exit_code
    except Interrupted as error:  # what was saved and how to continue; not an error
        click.echo(f"{who}{error}", err=True)
        return error.exit_code
    except UserError as error:
        click.echo(f"error: {who}{error}", err=True)
        return error.exit_code
    except (OSError, MemoryError, RuntimeError) as error:
        line = resource_error(error, data_parallel=bool(who))
        if line is None:
            raise
        click.echo(f"error: {who}{line}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
