"""The whole run: evaluate, SFT, evaluate, GRPO, evaluate; checkpoints, metrics and eval.json."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.algorithms.prompt_pool import PromptPool
from shared.checkpoints.folders import save_checkpoint
from shared.checkpoints.layouts import check_checkpoint, check_lora_rank, checkpoint_kind, model_dimensions
from shared.models.gguf_export import check_exportable, export_gguf
from shared.models.pretrained import SHIPPED_MODELS, ensure_shipped_model, hub_model_folder, local_model
from shared.models.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from shared.runtime.errors import Interrupted
from shared.runtime.tracking import MetricsLog
from shared.tasks.registry import load_task
from shared.tasks.task import RewardFailed, Task, TaskProblem
from shared.training.backend import Backend
from shared.training.config import EvalConfig, ModelConfig, RunConfig
from shared.training.evaluation import EvalResult, evaluate, paired_comparison, paired_line, results_table, sampled_line
from shared.training.loops import peak_memory, summed, train_grpo, train_sft
from shared.training.problem_sets import ProblemSets, check_memory, run_problem_sets
from shared.training.report import write_report
from shared.training.resume import (FINAL_FOLDERS, PERIODIC_FOLDER, STATE_FILE, RunState, drop_older_periodic,
                                    latest_resume_point, periodic_folder, phase_steps, stop_on_interrupt,
                                    write_run_status)
from shared.training.run_records import start_records

logger = logging.getLogger("local_reasoning")

STAGE_LABELS = {"before_sft": "before SFT", "after_sft": "after SFT", "headroom": "after SFT, sampled",
                "after_grpo": "after GRPO"}


def resolve_model(name: str, trust_remote_code: bool = False) -> Path | str:
    """'tiny' -> the embedded model's folder (built on first use); 'smollm2' -> the shipped model, imported on
    first use; a local folder, checked; a hub id as given, once its files are in the cache (downloaded once):
    saved adapters name it as their base."""
    if name == TINY_MODEL_NAME:
        return ensure_tiny_model()
    if name in SHIPPED_MODELS:
        return ensure_shipped_model(name)
    if Path(name).exists():
        return check_checkpoint(Path(name))
    hub_model_folder(name, trust_remote_code)
    return name


@dataclass
class Run:
    """One training run as it goes: its settings, the model, where it writes, and where it stands."""
    config: RunConfig
    backend: Backend
    output: Path
    metrics: MetricsLog
    state: RunState
    task: Task
    problems: ProblemSets  # drawn once, fitted to --max-seq-len
    pool: PromptPool | None = None  # GRPO's pass rates per prompt (dynamic sampling), saved with resume points


def run_training(config: RunConfig, backend: Backend, resume: tuple[RunState, Path] | None = None
                 ) -> tuple[dict[str, EvalResult], dict[str, EvalResult]]:
    """The run, fresh or continued from a resume point: evaluate, SFT, evaluate, GRPO, evaluate, each
    phase saving as it goes. Returns held-out results by stage and, after the last phase, by
    out-of-distribution set."""
    output = Path(config.output_dir)
    logger.info("backend %s, model %s, task %s, mode %s, output %s", backend.name, config.model.name,
                config.task.name, config.mode, output)
    if resume:
        logger.info("resuming from %s (%s step %d of %d)", resume[1], resume[0].phase.upper(), resume[0].step,
                    resume[0].total_steps)
    state, resume_folder = resume if resume else (RunState(), None)
    start = None if resume else starting_model(config, backend)  # checked before anything is written
    model_folder = local_model(start) if start is not None else resume_folder
    if config.export_gguf:  # llama.cpp can read what the run will write: known before it trains
        check_exportable(model_folder)
    task = load_task(config.task)
    dims = model_dimensions(model_folder)  # config.json, read once for the length check and the memory estimate
    problems = run_problem_sets(task, config, model_folder, dims)  # one too long for --max-seq-len: an error here
    check_memory(config, problems, dims, backend.sequences_per_pass, backend.available_memory())
    writes = backend.rank == 0  # in a data-parallel run one process writes; the others compute alike
    if writes:
        output.mkdir(parents=True, exist_ok=True)
        if resume is None:
            forget_previous_run(output)
            state = start_records(output, config)
        write_run_status(output, finished=False)
        (output / "run_config.json").write_text(config.to_json())
    metrics = MetricsLog(output / "metrics.jsonl", config.wandb_project, json.loads(config.to_json()),
                         keep_records=state.metrics_records, writes=writes)
    run = Run(config, backend, output, metrics, state, task, problems)
    out_of_distribution: dict[str, EvalResult] = {}
    try:
        if resume_folder:
            backend.load(resume_folder, config.model, trainable=True)
        if config.mode in ("sft", "full"):
            if resume is None:
                start_from(run, start)
                evaluate_stage(run, "before_sft")
            if state.phase == "sft" and not state.phase_complete:
                train_phase(run, "sft")
            if "after_sft" not in state.results:
                evaluate_stage(run, "after_sft")
        if config.mode in ("grpo", "full"):
            sft_folder = Path(config.sft_checkpoint) if config.mode == "grpo" else output / FINAL_FOLDERS["sft"]
            if config.mode == "grpo" and resume is None:
                start_from(run, start)
                evaluate_stage(run, "after_sft")
            if config.grpo.beta:  # the KL's reference is the policy GRPO started from
                backend.set_reference(sft_folder if state.phase == "grpo" else None)
            if config.eval.headroom_samples and "headroom" not in state.results:
                measure_headroom(run)
            if not (state.phase == "grpo" and state.phase_complete):
                train_phase(run, "grpo")
            if "after_grpo" not in state.results:
                evaluate_stage(run, "after_grpo")
        if config.eval.ood_problems:
            for name, extra in problems.extra.items():
                out_of_distribution[name] = evaluate_and_log(run, f"ood_{name}", name.replace("_", " "), extra)
    except KeyboardInterrupt:  # outside a training loop (an evaluation, a load): the last resume point stands
        hint = (f"continue with: python cli.py train --resume --output-dir {output}" if latest_resume_point(output)
                else "nothing was saved yet")
        raise Interrupted(f"interrupted; {hint}") from None
    finally:
        metrics.close()
    if writes:
        write_outputs(run, out_of_distribution)
        if config.export_gguf:
            export_final_model(run)
    return state.results, out_of_distribution


def export_final_model(run: Run) -> None:
    """The run's last model as reasoning_final.gguf (sft_final.gguf) beside its folder, with a Modelfile."""
    name = FINAL_FOLDERS["grpo" if run.config.mode in ("grpo", "full") else "sft"]
    exported = export_gguf(run.output / name, run.output / f"{name}.gguf", run.config.export_gguf, replace=True)
    logger.info("GGUF: %s", exported.summary())


def starting_model(config: RunConfig, backend: Backend) -> Path | str:
    """The model a fresh run starts from, resolved and checked against the run's LoRA rank."""
    folder = check_checkpoint(Path(config.sft_checkpoint)) if config.mode == "grpo" else \
        model_folder_once(config.model, backend)
    local = local_model(folder)
    if config.model.finetune == "lora" and checkpoint_kind(local) == "full":
        check_lora_rank(config.model.lora_rank, config.model.lora_targets, local)
    return folder


def model_folder_once(model: ModelConfig, backend: Backend) -> Path | str:
    """The model's folder, built, imported or downloaded on first use by the first process while the others wait."""
    if backend.rank == 0:
        folder = resolve_model(model.name, model.trust_remote_code)
    backend.all_sum(np.zeros(1))  # a barrier
    return folder if backend.rank == 0 else resolve_model(model.name, model.trust_remote_code)


def start_from(run: Run, model_path: Path | str) -> None:
    run.backend.seed(run.config.seed)
    run.backend.load(model_path, run.config.model, trainable=True)


def train_phase(run: Run, phase: str) -> None:
    """Train one phase from where the run stands: evaluate and save every N steps, stop on Ctrl-C
    after the current step with a resume point saved, and save the phase's final checkpoint."""
    config, state = run.config, run.state
    settings = getattr(config, phase)
    if phase == "sft":
        problems = run.problems.sft
        steps = functools.partial(train_sft, examples=run.problems.sft_examples)
        batch_size = config.sft.batch_size
    else:
        problems = run.problems.grpo
        batch_size = config.grpo.prompts_per_step
        resumed = state.phase == "grpo" and state.step and state.prompt_pool
        run.pool = None if not config.grpo.dynamic_sampling else \
            PromptPool(**state.prompt_pool) if resumed else PromptPool(len(problems))
        steps = functools.partial(train_grpo, rewards=run.task.rewards, pool=run.pool)
    total = phase_steps(len(problems), batch_size, settings.epochs)
    start_step = state.step if state.phase == phase else 0
    carried, began = (state.timings.get(f"{phase}_s", 0.0) if start_step else 0.0), time.perf_counter()
    run.backend.reset_peak_memory()
    with stop_on_interrupt() as stop, saved_when_a_reward_fails(run, phase, total, start_step, carried, began) as done:
        for step in steps(run.backend, problems, settings, config.seed, run.metrics, start_step):
            done.append(step)
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total:
                evaluate_and_log(run, phase, f"{phase} step {step}",
                                 run.problems.held_out[:config.eval.every_problems], step)
            stopping = stop_agreed(run, stop.requested)
            if step < total and (stopping or (settings.save_every and step % settings.save_every == 0)):
                folder = periodic_folder(run.output, phase, step)
                save(run, folder, phase, step, total, carried + time.perf_counter() - began)
                if run.backend.rank == 0:
                    drop_older_periodic(run.output, keep=folder)
                if stopping:
                    raise Interrupted(f"stopped at {phase.upper()} step {step} of {total}; saved {folder}; "
                                      f"continue with: python cli.py train --resume --output-dir {run.output}")
        save(run, run.output / FINAL_FOLDERS[phase], phase, total, total, carried + time.perf_counter() - began)
    if stop_agreed(run, stop.requested):
        raise Interrupted(f"stopped after {phase.upper()}; saved {run.output / FINAL_FOLDERS[phase]}; "
                          f"continue with: python cli.py train --resume --output-dir {run.output}")


@contextlib.contextmanager
def saved_when_a_reward_fails(run: Run, phase: str, total: int, start_step: int, carried: float, began: float):
    """A reward function that fails stops the phase with a resume point at the last finished step, to continue
    from once the reward file is fixed. Yields the list the loop adds each finished step to."""
    done: list[int] = []
    try:
        yield done
    except RewardFailed as error:
        last = done[-1] if done else start_step
        if not 0 < last < total:
            raise
        folder = periodic_folder(run.output, phase, last)
        save(run, folder, phase, last, total, carried + time.perf_counter() - began)
        if run.backend.rank == 0:
            drop_older_periodic(run.output, keep=folder)
        raise RewardFailed(f"{error}; saved {folder}; fix it, then continue with: python cli.py train --resume "
                           f"--output-dir {run.output}") from None


def stop_agreed(run: Run, requested: bool) -> bool:
    """Ctrl-C stops every process of a run at the same step, if any of them got it."""
    return bool(summed(run.backend, float(requested))[0])


def evaluate_stage(run: Run, stage: str) -> None:
    # the untrained model rarely answers and often rambles to the token cap: a subset tells as much
    held_out = run.problems.held_out
    problems = held_out[:run.config.eval.every_problems] if stage == "before_sft" else held_out
    run.state.results[stage] = evaluate_and_log(run, stage, STAGE_LABELS[stage], problems)


def measure_headroom(run: Run) -> None:
    """What GRPO could gain, before it spends its minutes: the SFT model sampled k times per problem at GRPO's
    temperature. maj@k above greedy: right answers the model already samples, for GRPO to make its first."""
    settings = dataclasses.replace(run.config.eval, samples_per_problem=run.config.eval.headroom_samples,
                                   temperature=run.config.grpo.temperature)
    problems = run.problems.held_out[:run.config.eval.headroom_problems]
    run.state.results["headroom"] = result = evaluate_and_log(run, "headroom", STAGE_LABELS["headroom"], problems,
                                                              settings=settings)
    logger.info("headroom before GRPO: %s", sampled_line("after SFT", result))


def evaluate_and_log(run: Run, stage: str, label: str, problems: list[TaskProblem], step: int | None = None,
                     settings: EvalConfig | None = None) -> EvalResult:
    run.backend.reset_peak_memory()
    result = evaluate(run.backend, run.task.rewards, problems, settings or run.config.eval, label=f"eval {label}")
    run.metrics({"phase": "eval", "stage": stage, **({"step": step} if step else {}), **result.summary(),
                 **peak_memory(run.backend)})
    run.metrics.samples(stage if step is None else f"{stage}_step_{step}", result.samples)
    logger.info("%s: accuracy %.1f%%, format %.1f%%", label, 100 * result.accuracy, 100 * result.format_compliance)
    return result


def save(run: Run, folder: Path, phase: str, step: int, total: int, seconds: float) -> None:
    """A checkpoint that is also a resume point: the weights with where the run stands."""
    state = run.state
    state.phase, state.step, state.total_steps, state.metrics_records = phase, step, total, len(run.metrics.records)
    state.timings[f"{phase}_s"] = seconds
    state.prompt_pool = run.pool.to_dict() if phase == "grpo" and run.pool else None
    if run.backend.rank == 0:
        save_checkpoint(run.backend, folder, run.config.to_json(), {STATE_FILE: state.to_json()})


def write_outputs(run: Run, out_of_distribution: dict[str, EvalResult]) -> None:
    """eval.json and report.md; the resume points go and the run is marked finished."""
    state = run.state
    write_eval_json(run.output / "eval.json", state.results, out_of_distribution, state.timings)
    write_report(run.output, run.config.to_json(), run.metrics.records, state.results, out_of_distribution,
                 state.timings, STAGE_LABELS, grpo_gain(state.results))
    shutil.rmtree(run.output / PERIODIC_FOLDER, ignore_errors=True)
    write_run_status(run.output, finished=True)


def forget_previous_run(output: Path) -> None:
    """A fresh run in a used folder: the old run's resume points go (its finished models stay until replaced)."""
    shutil.rmtree(output / PERIODIC_FOLDER, ignore_errors=True)
    for name in FINAL_FOLDERS.values():
        (output / name / STATE_FILE).unlink(missing_ok=True)


def results_text(results: dict[str, EvalResult], out_of_distribution: dict[str, EvalResult]) -> str:
    """What `train` prints at the end: the stages' table, GRPO's paired gain, the out-of-distribution table."""
    text = results_table({STAGE_LABELS[stage]: result for stage, result in results.items()})
    if gain := grpo_gain(results):
        text += "\n" + paired_line(gain, "after SFT", "after GRPO")
    if out_of_distribution:
        text += "\n\nout of distribution:\n" + results_table(out_of_distribution, first_column="problem set")
    return text


def grpo_gain(results: dict[str, EvalResult]) -> dict | None:
    """After GRPO against after SFT on the same held-out problems, where the run has both."""
    before, after = results.get("after_sft"), results.get("after_grpo")
    if before is None or after is None or len(before.solved) != len(after.solved) or not before.solved:
        return None
    return paired_comparison(before.solved, after.solved)


def write_eval_json(path: Path, results: dict[str, EvalResult], out_of_distribution: dict[str, EvalResult],
                    timings: dict[str, float]) -> None:
    payload = {"in_distribution": {stage: {**r.summary(), "samples": r.samples, "solved": r.solved}
                                   for stage, r in results.items()},
               "grpo_vs_sft": grpo_gain(results),
               "out_of_distribution": {name: {**r.summary(), "samples": r.samples}
                                       for name, r in out_of_distribution.items()},
               "timings": timings,
               "table": results_table({STAGE_LABELS[s]: r for s, r in results.items()}),
               "ood_table": results_table(out_of_distribution, first_column="problem set")}
    path.write_text(json.dumps(payload, indent=2))
