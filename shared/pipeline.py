"""The whole run: evaluate, SFT, evaluate, GRPO, evaluate; checkpoints, metrics and eval.json."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from shared.backend import Backend
from shared.checkpoints import check_checkpoint, save_checkpoint
from shared.config import RunConfig
from shared.data import generate_problems
from shared.evaluation import EvalResult, evaluate, out_of_distribution_sets, results_table
from shared.pretrained import SHIPPED_MODELS, ensure_shipped_model
from shared.report import write_report
from shared.resume import (FINAL_FOLDERS, PERIODIC_FOLDER, STATE_FILE, Interrupted, RunState, drop_older_periodic,
                           latest_resume_point, periodic_folder, phase_steps, stop_on_interrupt, write_run_status)
from shared.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from shared.tracking import MetricsLog
from shared.training import train_grpo, train_sft

logger = logging.getLogger("local_reasoning")

STAGE_LABELS = {"before_sft": "before SFT", "after_sft": "after SFT", "after_grpo": "after GRPO"}


def resolve_model(name: str) -> Path | str:
    """'tiny' -> the embedded model's folder (built on first use); 'smollm2' -> the shipped model, imported on
    first use; a local folder, checked; a hub id as given."""
    if name == TINY_MODEL_NAME:
        return ensure_tiny_model()
    if name in SHIPPED_MODELS:
        return ensure_shipped_model(name)
    return check_checkpoint(Path(name)) if Path(name).exists() else name


def run_training(config: RunConfig, backend: Backend, resume: tuple[RunState, Path] | None = None
                 ) -> tuple[dict[str, EvalResult], dict[str, EvalResult]]:
    """The run, fresh or continued from a resume point; returns held-out results by stage and, after
    the last phase, by out-of-distribution set."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    state, resume_folder = resume if resume else (RunState(), None)
    if resume is None:
        forget_previous_run(output)
    write_run_status(output, finished=False)
    (output / "run_config.json").write_text(config.to_json())
    metrics = MetricsLog(output / "metrics.jsonl", config.wandb_project, json.loads(config.to_json()),
                         keep_records=state.metrics_records)
    eval_problems = generate_problems(config.eval.num_problems, config.seed, held_out=True)
    results = state.results
    out_of_distribution: dict[str, EvalResult] = {}

    def evaluate_and_log(stage: str, label: str, step: int | None = None, problems=None) -> EvalResult:
        result = evaluate(backend, problems or eval_problems, config.eval, label=f"eval {label}")
        metrics({"phase": "eval", "stage": stage, **({"step": step} if step else {}), **result.summary()})
        metrics.samples(stage if step is None else f"{stage}_step_{step}", result.samples)
        logger.info("%s: accuracy %.1f%%, format %.1f%%", label, 100 * result.accuracy,
                    100 * result.format_compliance)
        return result

    def evaluate_stage(stage: str) -> None:
        results[stage] = evaluate_and_log(stage, STAGE_LABELS[stage])

    def save(folder: Path, phase: str, step: int, total: int, seconds: float) -> None:
        state.phase, state.step, state.total_steps, state.metrics_records = phase, step, total, len(metrics.records)
        state.timings[f"{phase}_s"] = seconds
        save_checkpoint(backend, folder, config.to_json(), {STATE_FILE: state.to_json()})

    def run_phase(phase: str, train, problems: list, batch_size: int, epochs: int, save_every: int) -> None:
        """Train one phase from where the state stands, saving every `save_every` steps and on Ctrl-C."""
        total = phase_steps(len(problems), batch_size, epochs)
        start_step = state.step if state.phase == phase else 0
        carried, began = (state.timings.get(f"{phase}_s", 0.0) if start_step else 0.0), time.perf_counter()

        def on_step(step: int) -> None:
            if config.eval.every_steps and step % config.eval.every_steps == 0:
                evaluate_and_log(phase, f"{phase} step {step}", step)
            if step < total and (stop.requested or (save_every and step % save_every == 0)):
                folder = periodic_folder(output, phase, step)
                save(folder, phase, step, total, carried + time.perf_counter() - began)
                drop_older_periodic(output, keep=folder)
                if stop.requested:
                    raise Interrupted(f"stopped at {phase.upper()} step {step} of {total}; saved {folder}; "
                                      f"continue with: python cli.py train --resume --output-dir {output}")

        with stop_on_interrupt() as stop:
            train(backend, problems, getattr(config, phase), config.seed, metrics, on_step, start_step)
            save(output / FINAL_FOLDERS[phase], phase, total, total, carried + time.perf_counter() - began)
        if stop.requested:
            raise Interrupted(f"stopped after {phase.upper()}; saved {output / FINAL_FOLDERS[phase]}; "
                              f"continue with: python cli.py train --resume --output-dir {output}")

    try:
        if resume_folder:
            backend.load(resume_folder, config.model, trainable=True)
        if config.mode in ("sft", "full"):
            if resume is None:
                backend.seed(config.seed)
                backend.load(resolve_model(config.model.name), config.model, trainable=True)
                evaluate_stage("before_sft")
            if state.phase == "sft" and not state.phase_complete:
                problems = generate_problems(config.sft.num_samples, config.seed, held_out=False)
                run_phase("sft", train_sft, problems, config.sft.batch_size, config.sft.epochs, config.sft.save_every)
            if "after_sft" not in results:
                evaluate_stage("after_sft")
        if config.mode in ("grpo", "full"):
            sft_folder = Path(config.sft_checkpoint) if config.mode == "grpo" else output / FINAL_FOLDERS["sft"]
            if config.mode == "grpo" and resume is None:
                backend.seed(config.seed)
                backend.load(check_checkpoint(sft_folder), config.model, trainable=True)
                evaluate_stage("after_sft")
            if config.grpo.beta:  # the KL's reference is the policy GRPO started from
                backend.set_reference(sft_folder if state.phase == "grpo" else None)
            if not (state.phase == "grpo" and state.phase_complete):
                problems = generate_problems(config.grpo.num_prompts, config.seed + 1, held_out=False)
                run_phase("grpo", train_grpo, problems, config.grpo.prompts_per_step, config.grpo.epochs,
                          config.grpo.save_every)
            if "after_grpo" not in results:
                evaluate_stage("after_grpo")
        if config.eval.ood_problems:
            for name, problems in out_of_distribution_sets(config.eval.ood_problems, config.seed).items():
                out_of_distribution[name] = evaluate_and_log(f"ood_{name}", name.replace("_", " "), problems=problems)
    except KeyboardInterrupt:  # outside a training loop (an evaluation, a load): the last resume point stands
        hint = (f"continue with: python cli.py train --resume --output-dir {output}" if latest_resume_point(output)
                else "nothing was saved yet")
        raise Interrupted(f"interrupted; {hint}") from None
    finally:
        metrics.close()
    write_eval_json(output / "eval.json", results, out_of_distribution, state.timings)
    write_report(output, config.to_json(), metrics.records, results, out_of_distribution, state.timings,
                 STAGE_LABELS)
    shutil.rmtree(output / PERIODIC_FOLDER, ignore_errors=True)
    write_run_status(output, finished=True)
    return results, out_of_distribution


def forget_previous_run(output: Path) -> None:
    """A fresh run in a used folder: the old run's resume points go (its finished models stay until replaced)."""
    shutil.rmtree(output / PERIODIC_FOLDER, ignore_errors=True)
    for name in FINAL_FOLDERS.values():
        (output / name / STATE_FILE).unlink(missing_ok=True)


def write_eval_json(path: Path, results: dict[str, EvalResult], out_of_distribution: dict[str, EvalResult],
                    timings: dict[str, float]) -> None:
    payload = {"in_distribution": {stage: {**r.summary(), "samples": r.samples} for stage, r in results.items()},
               "out_of_distribution": {name: {**r.summary(), "samples": r.samples}
                                       for name, r in out_of_distribution.items()},
               "timings": timings,
               "table": results_table({STAGE_LABELS[s]: r for s, r in results.items()}),
               "ood_table": results_table(out_of_distribution, first_column="problem set")}
    path.write_text(json.dumps(payload, indent=2))
