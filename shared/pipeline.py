"""The whole run: evaluate, SFT, evaluate, GRPO, evaluate; checkpoints, metrics and eval.json."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from shared.backend import Backend
from shared.checkpoints import check_checkpoint, save_checkpoint
from shared.config import RunConfig
from shared.data import generate_problems
from shared.evaluation import EvalResult, evaluate, out_of_distribution_sets, results_table
from shared.report import write_report
from shared.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from shared.tracking import MetricsLog
from shared.training import train_grpo, train_sft

logger = logging.getLogger("local_reasoning")

STAGE_LABELS = {"before_sft": "before SFT", "after_sft": "after SFT", "after_grpo": "after GRPO"}


def resolve_model(name: str) -> Path | str:
    """'tiny' -> the embedded model's folder (built on first use); anything else as given."""
    return ensure_tiny_model() if name == TINY_MODEL_NAME else name


def run_training(config: RunConfig, backend: Backend) -> tuple[dict[str, EvalResult], dict[str, EvalResult]]:
    """The run; returns held-out results by stage and, after the last phase, by out-of-distribution set."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "run_config.json").write_text(config.to_json())
    metrics = MetricsLog(output / "metrics.jsonl", config.wandb_project, json.loads(config.to_json()))
    eval_problems = generate_problems(config.eval.num_problems, config.seed, held_out=True)
    results: dict[str, EvalResult] = {}
    out_of_distribution: dict[str, EvalResult] = {}
    timings: dict[str, float] = {}

    def evaluate_and_log(stage: str, label: str, step: int | None = None, problems=None) -> EvalResult:
        result = evaluate(backend, problems or eval_problems, config.eval, label=f"eval {label}")
        metrics({"phase": "eval", "stage": stage, **({"step": step} if step else {}), **result.summary()})
        metrics.samples(stage if step is None else f"{stage}_step_{step}", result.samples)
        logger.info("%s: accuracy %.1f%%, format %.1f%%", label, 100 * result.accuracy,
                    100 * result.format_compliance)
        return result

    def evaluate_during(phase: str):
        def on_step(step: int) -> None:
            if config.eval.every_steps and step % config.eval.every_steps == 0:
                evaluate_and_log(phase, f"{phase} step {step}", step)
        return on_step

    def evaluate_stage(stage: str) -> None:
        results[stage] = evaluate_and_log(stage, STAGE_LABELS[stage])

    try:
        if config.mode in ("sft", "full"):
            backend.load(resolve_model(config.model.name), config.model, trainable=True)
            evaluate_stage("before_sft")
            problems = generate_problems(config.sft.num_samples, config.seed, held_out=False)
            began = time.perf_counter()
            train_sft(backend, problems, config.sft, config.seed, metrics, evaluate_during("sft"))
            timings["sft_s"] = time.perf_counter() - began
            save_checkpoint(backend, output / "sft_final", config.to_json())
            evaluate_stage("after_sft")
        if config.mode in ("grpo", "full"):
            if config.mode == "grpo":
                backend.load(check_checkpoint(Path(config.sft_checkpoint)), config.model, trainable=True)
                evaluate_stage("after_sft")
            problems = generate_problems(config.grpo.num_prompts, config.seed + 1, held_out=False)
            began = time.perf_counter()
            train_grpo(backend, problems, config.grpo, config.seed, metrics, evaluate_during("grpo"))
            timings["grpo_s"] = time.perf_counter() - began
            save_checkpoint(backend, output / "reasoning_final", config.to_json())
            evaluate_stage("after_grpo")
        if config.eval.ood_problems:
            for name, problems in out_of_distribution_sets(config.eval.ood_problems, config.seed).items():
                out_of_distribution[name] = evaluate_and_log(f"ood_{name}", name.replace("_", " "), problems=problems)
    finally:
        metrics.close()
    write_eval_json(output / "eval.json", results, out_of_distribution, timings)
    write_report(output, config.to_json(), metrics.records, results, out_of_distribution, timings, STAGE_LABELS)
    return results, out_of_distribution


def write_eval_json(path: Path, results: dict[str, EvalResult], out_of_distribution: dict[str, EvalResult],
                    timings: dict[str, float]) -> None:
    payload = {"in_distribution": {stage: {**r.summary(), "samples": r.samples} for stage, r in results.items()},
               "out_of_distribution": {name: {**r.summary(), "samples": r.samples}
                                       for name, r in out_of_distribution.items()},
               "timings": timings,
               "table": results_table({STAGE_LABELS[s]: r for s, r in results.items()}),
               "ood_table": results_table(out_of_distribution, first_column="problem set")}
    path.write_text(json.dumps(payload, indent=2))
