"""GRPO step time on the tiny model after 300 SFT steps (it writes the format, often wrongly, so rewards differ
within groups): ours (PyTorch) vs TRL GRPOTrainer, 16 prompts x G=8, 200 tokens. Also the GRPO workers and
starting policies the SmolLM2 group uses.

    python bench/grpo.py [--quick] [--json PATH]      (bench/run.py --only tiny-grpo)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project's root

from bench.common import (GROUP, GRPO_PROMPTS, MAX_NEW, Rows, conversations, lora_config, problems, row,  # noqa: E402
                          run_alone, run_worker, smollm2_folder, step_timer, tiny_folder)

GRPO_START_SFT_STEPS = 300
SMOLLM2_SFT_STEPS = 40  # enough for the format and about half the answers: GRPO groups then differ


def ours_grpo(steps: int, policy: str, preset: str = "tiny") -> dict:
    """GRPO steps with the preset's settings (the smollm2 preset trains new LoRA adapters on the policy)."""
    from shared.tasks.addition.rewards import ADDITION_REWARDS
    from shared.training.config import build_run_config
    from shared.training.loops import train_grpo
    from backends import make_backend

    config = build_run_config({"model": {"name": preset}}, {})
    config.grpo.save_every = 0
    backend = make_backend("torch")
    backend.load(Path(policy), config.model, trainable=True)
    records = []
    per_step = config.grpo.prompts_per_step * config.grpo.group_size
    for _ in train_grpo(backend, problems(config.grpo.prompts_per_step * (steps + 1), seed=1), config.grpo, 0,
                        records.append, rewards=ADDITION_REWARDS):
        pass
    durations = [r["step_s"] for r in records][1:]
    return {"step_s": sum(durations) / len(durations),
            "completion_tokens": sum(r["completion_tokens"] for r in records) / len(records),
            "trained": sum(r["trained_sequences"] for r in records) / (len(records) * per_step)}


def trl_grpo(steps: int, policy: str, prompts: int = GRPO_PROMPTS, max_new: int = MAX_NEW, temperature: float = 1.0,
             lr: float = 5e-5, lora: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from shared.models.prompts import stop_token_ids
    from shared.tasks.addition.rewards import ADDITION_REWARDS
    from shared.tasks.addition.task import AdditionTask
    from shared.tasks.task import combined_reward, reward_components, reward_weights

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    model.generation_config.eos_token_id = sorted(stop_token_ids(tokenizer))  # ours stops there, TRL reads this
    items = problems(prompts * (steps + 1), seed=1)
    by_prompt = {p.prompt: p for p in items}

    def reward(prompts, completions, **_):
        return [combined_reward(reward_components(ADDITION_REWARDS, c[0]["content"], by_prompt[p[-1]["content"]]),
                                reward_weights(AdditionTask().rewards))
                for p, c in zip(prompts, completions)]

    timing = step_timer()
    args = GRPOConfig(output_dir="/tmp/bench_trl_grpo", per_device_train_batch_size=prompts * GROUP,
                      num_generations=GROUP, max_completion_length=max_new, temperature=temperature, learning_rate=lr,
                      beta=0.0, loss_type="grpo", max_steps=steps + 1, report_to=[], save_strategy="no",
                      logging_steps=1, use_cpu=True, disable_tqdm=True, shuffle_dataset=False,
                      bf16=False, gradient_checkpointing=False)  # fp32 like ours; no recomputation
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": c["prompt"]} for c in conversations(items)]),
                          callbacks=[timing], peft_config=lora_config() if lora else None)
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return {"step_s": sum(timing.durations[1:]) / (len(timing.durations) - 1),
            "completion_tokens": sum(lengths) / len(lengths)}


def sft_policy(steps: int = GRPO_START_SFT_STEPS) -> dict:
    """The tiny model after `steps` SFT steps (preset settings), saved once: a policy that writes the
    format but is still often wrong, so rewards differ within groups, as when GRPO is worth running."""
    folder = Path(f"/tmp/bench_tiny_sft_{steps}")
    if not (folder / "model.safetensors").exists():
        from shared.checkpoints.folders import save_checkpoint
        from shared.training.config import build_run_config
        from shared.training.loops import train_sft
        from backends import make_backend

        config = build_run_config({"model": {"name": "tiny"}}, {})
        config.sft.save_every = 0
        backend = make_backend("torch")
        backend.seed(0)
        backend.load(tiny_folder(), config.model, trainable=True)
        for _ in train_sft(backend, problems(config.sft.batch_size * steps, seed=3), config.sft, 0,
                           lambda record: None):
            pass
        save_checkpoint(backend, folder, config.to_json())
    return {"folder": str(folder)}


def smollm2_sft_policy(steps: int = SMOLLM2_SFT_STEPS) -> dict:
    """SmolLM2 after `steps` LoRA SFT steps (its preset), the adapter merged: the GRPO benchmarks' start,
    where both ours and TRL put fresh LoRA adapters on it."""
    folder = Path(f"/tmp/bench_smollm2_sft_{steps}")
    if not (folder / "model.safetensors").exists():
        import shutil

        from shared.checkpoints.conversion import ConversionRequest, convert_checkpoint
        from shared.checkpoints.folders import save_checkpoint
        from shared.training.config import build_run_config
        from shared.training.loops import train_sft
        from backends import make_backend

        config = build_run_config({"model": {"name": "smollm2"}}, {})
        backend = make_backend("torch")
        backend.seed(0)
        backend.load(Path(smollm2_folder()), config.model, trainable=True)
        for _ in train_sft(backend, problems(config.sft.batch_size * steps, seed=3), config.sft, 0,
                           lambda record: None):
            pass
        adapter = folder.with_name(folder.name + "-adapter")
        save_checkpoint(backend, adapter, config.to_json())
        shutil.rmtree(folder, ignore_errors=True)
        convert_checkpoint(ConversionRequest(adapter, "torch", merge=True), folder)
    return {"folder": str(folder)}


def rows(quick: bool) -> Rows:
    steps = 4 if quick else 8
    policy = run_worker(sft_policy)["folder"]
    ours = run_worker(ours_grpo, steps=steps, policy=policy)
    trl = run_worker(trl_grpo, steps=steps, policy=policy)
    yield row(f"GRPO step, tiny after {GRPO_START_SFT_STEPS} SFT steps, {GRPO_PROMPTS} prompts x G={GROUP}, "
              f"≤ {MAX_NEW} tokens (mean {ours['completion_tokens']:.0f} ours, {trl['completion_tokens']:.0f} "
              f"TRL; {ours['trained']:.0%} of rows with a gradient): ours (PyTorch) vs TRL GRPOTrainer",
              ours["step_s"], trl["step_s"], "s/step", 0.4, True)


if __name__ == "__main__":
    run_alone(rows, __doc__)
