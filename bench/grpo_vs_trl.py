"""Our GRPO against TRL's GRPOTrainer from the same SmolLM2 SFT checkpoint, given the same wall-clock minutes.

    python bench/grpo_vs_trl.py [--sft-checkpoint DIR] [--ours-checkpoint DIR] [--work DIR] [--eval-samples N]
                                [--json PATH]
    python bench/run.py --only grpo-vs-trl [--sft-checkpoint DIR]

1. The SFT checkpoint: --sft-checkpoint, or `train --model smollm2 --mode sft --num-samples 500` into WORK/sft.
2. Ours: `train --mode grpo --sft-checkpoint ...` with the smollm2 preset, evaluated by the run itself before and
   after GRPO on the same N held-out problems; its GRPO minutes set the budget.
3. TRL: `GRPOTrainer` continues the same LoRA adapter (PEFT, trainable) with TRL's own defaults for what ours
   does not set (loss type, reward scaling, clipping), the same reward functions and weights, our run's
   learning rate (constant), temperature, group size, prompts per step and completion cap, no activation
   recomputation (as ours), stopped when the budget is spent; then `eval` scores its adapter on the same problems.
Both are paired against the SFT checkpoint's answers on those problems (McNemar's exact p). Each piece is kept
in WORK and reused when run again, so an interrupted bench continues.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.training.config import PRESETS  # noqa: E402
from shared.training.evaluation import paired_comparison  # noqa: E402

WORK = Path("/tmp/bench_grpo_vs_trl")
SFT_PROBLEMS = 500  # the row where the preset's GRPO used to add nothing (+0.3 points)


def cli(*arguments) -> None:
    command = [sys.executable, str(ROOT / "cli.py"), *map(str, arguments)]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {' '.join(command[2:4])} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    print(f"  cli.py {' '.join(command[2:4])}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)


def score(checkpoint: Path, eval_samples: int, json_path: Path) -> None:
    """`eval` on the held-out problems the runs evaluate on (the same count, seed and completion cap)."""
    cli("eval", "--checkpoint", checkpoint, "--backend", "torch", "--num-samples", eval_samples, "--ood-samples", 0,
        "--max-new-tokens", PRESETS["smollm2"]["eval"]["max_new_tokens"], "--json", json_path)


def sft_checkpoint(work: Path, given: Path | None) -> Path:
    if given:
        return given
    folder = work / "sft"
    if not (folder / "eval.json").exists():
        cli("train", "--model", "smollm2", "--mode", "sft", "--num-samples", SFT_PROBLEMS, "--backend", "torch",
            "--ood-samples", 0, "--no-wandb", "--output-dir", folder)
    return folder / "sft_final"


def ours(sft: Path, work: Path, eval_samples: int) -> dict:
    """Our GRPO with the preset, as a user runs it; its minutes, steps, completions and answers."""
    folder = work / "ours"
    if not (folder / "eval.json").exists():
        cli("train", "--mode", "grpo", "--sft-checkpoint", sft, "--backend", "torch", "--eval-samples", eval_samples,
            "--ood-samples", 0, "--no-wandb", "--output-dir", folder)
    stages = json.loads((folder / "eval.json").read_text())["in_distribution"]
    return {**grpo_steps(folder), "sft_solved": stages["after_sft"]["solved"], "solved": stages["after_grpo"]["solved"]}


def ours_from_checkpoint(checkpoint: Path, work: Path, eval_samples: int) -> dict:
    """A GRPO resume point of ours already trained (checkpoints/grpo-step-N of a `train --mode grpo` run): its
    minutes and steps from the run's metrics up to step N, its answers from `eval`, the SFT answers from the run."""
    state = json.loads((checkpoint / "training_state.json").read_text())
    scored = work / "ours_checkpoint_eval.json"
    if not scored.exists():
        score(checkpoint, eval_samples, scored)
    return {**grpo_steps(checkpoint.parents[1], state["step"]), "solved": json.loads(scored.read_text())[
        "in_distribution"]["solved"], "sft_solved": state["results"]["after_sft"]["solved"]}


def grpo_steps(run: Path, last: int | None = None) -> dict:
    """A run's GRPO minutes (its steps' own time), steps and completions sampled, up to step `last`."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("phase") == "grpo" and (last is None or r["step"] <= last)]
    settings = json.loads((run / "run_config.json").read_text())["grpo"]
    return {"minutes": sum(r["step_s"] for r in steps) / 60, "steps": len(steps),
            "completions": settings["group_size"] * sum(r.get("sampled_groups", 0) for r in steps),
            "settings": settings}


def trl_grpo(sft: str, minutes: float, output: str, settings: dict) -> dict:
    """TRL's GRPOTrainer on the SFT adapter for `minutes` of training with our run's GRPO `settings` where TRL has
    the same setting; saves the adapter in `output`."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from shared.checkpoints.layouts import adapter_base
    from shared.models.prompts import stop_token_ids
    from shared.tasks.registry import checkpoint_task

    task = checkpoint_task(Path(sft), None, None)
    tokenizer = AutoTokenizer.from_pretrained(sft, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(adapter_base(Path(sft)), dtype=torch.float32)
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer))  # where ours stops; TRL reads this
    model = PeftModel.from_pretrained(model, sft, is_trainable=True)
    problems = task.training_problems(4096, 43, for_sft=False)  # more than the minutes can use
    by_prompt = {p.prompt: p for p in problems}

    def reward_function(name):
        function = task.rewards[name].function

        def reward(prompts, completions, **_):
            return [float(function(c[0]["content"], by_prompt[p[-1]["content"]])) for p, c in zip(prompts, completions)]
        reward.__name__ = name
        return reward

    class StopAfter(TrainerCallback):
        def __init__(self):
            self.began, self.seconds = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = self.began or time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.began
            control.should_training_stop = self.seconds >= minutes * 60

    clock = StopAfter()
    args = GRPOConfig(output_dir=output + "-trainer", per_device_train_batch_size=settings["prompts_per_step"] *
                      settings["group_size"], num_generations=settings["group_size"],
                      max_completion_length=settings["max_new_tokens"], temperature=settings["temperature"],
                      learning_rate=settings["lr"], lr_scheduler_type="constant", max_steps=100_000,
                      reward_weights=[r.weight for r in task.rewards.values()], report_to=[], save_strategy="no",
                      logging_steps=1, use_cpu=True, disable_tqdm=True, bf16=False, seed=42,
                      gradient_checkpointing=False)  # ours does not recompute activations either
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_function(name) for name in task.rewards], args=args,
                          processing_class=tokenizer, callbacks=[clock],
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}]}
                                                           for p in problems]))
    trainer.train()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    shutil.copy(Path(sft) / "run_config.json", Path(output) / "run_config.json")  # the task, for `eval`
    steps = trainer.state.global_step
    return {"minutes": clock.seconds / 60, "steps": steps,
            "completions": steps * settings["prompts_per_step"] * settings["group_size"]}


def trl(sft: Path, minutes: float, settings: dict, work: Path, eval_samples: int) -> dict:
    folder = work / "trl"
    if not (folder / "result.json").exists():
        command = [sys.executable, __file__, "--worker", json.dumps({"sft": str(sft), "minutes": minutes,
                                                                     "output": str(folder / "adapter"),
                                                                     "settings": settings})]
        began = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"error: TRL GRPOTrainer failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        print(f"  TRL GRPOTrainer: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        (folder / "result.json").write_text(result.stdout.strip().splitlines()[-1])
    if not (folder / "eval.json").exists():
        score(folder / "adapter", eval_samples, folder / "eval.json")
    measured = json.loads((folder / "result.json").read_text())
    return {**measured, "solved": json.loads((folder / "eval.json").read_text())["in_distribution"]["solved"]}


def rows(sft_given: Path | None = None, work: Path = WORK, eval_samples: int = 1000,
         ours_checkpoint: Path | None = None) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    sft = sft_checkpoint(work, sft_given)
    mine = ours_from_checkpoint(ours_checkpoint, work, eval_samples) if ours_checkpoint else \
        ours(sft, work, eval_samples)
    peer = trl(sft, mine["minutes"], mine["settings"], work, eval_samples)
    paired = {name: paired_comparison(mine["sft_solved"], run["solved"]) for name, run in (("ours", mine),
                                                                                          ("peer", peer))}
    label = f"SmolLM2 GRPO from one SFT checkpoint ({len(mine['solved']):,} held-out problems)"
    measured = [("SmolLM2 GRPO paired gain at equal minutes", 100 * paired["ours"]["difference"],
                 100 * paired["peer"]["difference"], "points"),
                (f"{label}: McNemar p of the gain", paired["ours"]["p_value"], paired["peer"]["p_value"], "p"),
                (f"{label}: accuracy after GRPO", 100 * mine["solved"].count("1") / len(mine["solved"]),
                 100 * peer["solved"].count("1") / len(peer["solved"]), "%"),
                (f"{label}: minutes of GRPO", mine["minutes"], peer["minutes"], "minutes"),
                (f"{label}: optimiser steps", mine["steps"], peer["steps"], "steps"),
                (f"{label}: completions sampled", mine["completions"], peer["completions"], "completions")]
    return [{"name": name, "ours": ours_value, "peer": peer_value, "unit": unit, "ratio": None, "goal": None,
             "lower_is_better": False} for name, ours_value, peer_value, unit in measured]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-checkpoint", type=Path, help="start both from this SmolLM2 SFT checkpoint")
    parser.add_argument("--work", type=Path, default=WORK, help="where each piece is kept (and reused)")
    parser.add_argument("--eval-samples", type=int, default=1000, help="held-out problems both are scored on")
    parser.add_argument("--ours-checkpoint", type=Path,
                        help="ours already trained: a GRPO resume point of a `train --mode grpo` run from the same "
                        "SFT checkpoint, instead of running the preset")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(trl_grpo(**json.loads(args.worker))))
        return
    measured = rows(args.sft_checkpoint, args.work, args.eval_samples, args.ours_checkpoint)
    print("| benchmark | ours | peer | unit |\n|---|---|---|---|")
    print("\n".join(f"| {r['name']} | {r['ours']:.3g} | {r['peer']:.3g} | {r['unit']} |" for r in measured))
    if args.json:
        args.json.write_text(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
