"""Peak memory of a training step, ours against the peers, side by side in one run (bench/run.py --only memory).

    python bench/memory.py [--json PATH]

SmolLM2-135M-Instruct with LoRA (r=16 on every projection), the preset's shapes:
  - SFT step, batch 4 addition problems: ours (PyTorch) vs TRL SFTTrainer + PEFT; ours (MLX) vs mlx_lm.lora.
  - GRPO step, 4 prompts x G=8, every completion 160 tokens (the rollout, then the update on all 32 rows):
    ours (PyTorch) vs TRL GRPOTrainer + PEFT, both without and both with gradient checkpointing (TRL's default);
    ours (MLX) alone, mlx-lm having no GRPO.
Each measurement runs in its own process and reports the process's peak resident memory over its steps, the
model loaded before (the Linux high-water mark, reset when the steps begin). Same settings, same loss: the GRPO
rows say how far ours with gradient checkpointing is from ours without.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the project's root

from bench.common import (LORA_TARGETS, conversations, lora_config, parsed_or_worker, peak_memory_gb,  # noqa: E402
                          print_rows, problems, row, run_worker, smollm2_folder)

GROUP, PROMPTS, COMPLETION = 8, 4, 160
SFT_BATCH = 4


def start_peak() -> None:
    import gc

    from shared.runtime.memory import reset_peak_rss
    gc.collect()
    reset_peak_rss()


def ours_sft(backend_name: str, recompute: bool) -> dict:
    from shared.algorithms.padding import pack_batch
    from shared.models.prompts import encode_prompts, encode_targets
    from shared.training.config import ModelConfig, SFTConfig
    from backends import make_backend

    backend = make_backend(backend_name)
    backend.seed(0)
    backend.load(Path(smollm2_folder()), ModelConfig(name="smollm2", gradient_checkpointing=recompute))
    chosen = problems(SFT_BATCH)
    batch = pack_batch(encode_prompts(backend.tokenizer, chosen), encode_targets(backend.tokenizer, chosen),
                       backend.tokenizer.pad_token_id)
    start_peak()
    backend.reset_peak_memory()
    losses = [backend.sft_step(batch, 2e-4, SFTConfig())["loss"] for _ in range(2)]
    return {"peak_gb": peak_memory_gb(), "framework_peak_gb": backend.peak_memory() / 2**30, "loss": losses[0]}


def trl_sft() -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    args = SFTConfig(output_dir="/tmp/bench_memory_trl_sft", per_device_train_batch_size=SFT_BATCH, max_steps=2,
                     learning_rate=2e-4, report_to=[], save_strategy="no", completion_only_loss=True, use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(folder),
                         train_dataset=Dataset.from_list(conversations(problems(2 * SFT_BATCH))),
                         peft_config=lora_config())
    start_peak()
    trainer.train()
    return {"peak_gb": peak_memory_gb()}


def mlx_lm_sft() -> dict:
    import reasoning_mlx  # noqa: F401  (first: OpenBLAS on Linux, as ours gets)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer = load(smollm2_folder())
    model.freeze()
    keys = sorted(name for name, _ in model.layers[0].named_modules() if name.rsplit(".", 1)[-1] in LORA_TARGETS)
    linear_to_lora_layers(model, len(model.layers), {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": keys})
    records = [{"messages": c["prompt"] + c["completion"]} for c in conversations(problems(2 * SFT_BATCH))]
    args = TrainingArgs(batch_size=SFT_BATCH, iters=2, steps_per_report=1, steps_per_eval=10**9,
                        steps_per_save=10**9, max_seq_length=512, adapter_file="/tmp/bench_memory_mlx_lm.safetensors")
    dataset = CacheDataset(ChatDataset(records, tokenizer, mask_prompt=True))
    start_peak()
    mx.reset_peak_memory()
    train(model=model, optimizer=optim.AdamW(learning_rate=2e-4), train_dataset=dataset, args=args)
    return {"peak_gb": peak_memory_gb(), "framework_peak_gb": mx.get_peak_memory() / 2**30}


def ours_grpo(backend_name: str, recompute: bool) -> dict:
    """The rollout of 4 prompts x 8, then one update on the 32 rows, each completion made 160 tokens long."""
    import numpy as np

    from shared.algorithms.padding import pack_batch
    from shared.models.prompts import encode_prompts
    from shared.training.backend import GRPOBatch
    from shared.training.config import GRPOConfig, ModelConfig
    from backends import make_backend

    backend = make_backend(backend_name)
    backend.seed(0)
    backend.load(Path(smollm2_folder()), ModelConfig(name="smollm2", gradient_checkpointing=recompute))
    settings = GRPOConfig(max_new_tokens=COMPLETION, temperature=0.8, lr=2e-5)
    prompts = [ids for ids in encode_prompts(backend.tokenizer, problems(PROMPTS)) for _ in range(GROUP)]
    rng = np.random.default_rng(0)
    start_peak()
    backend.reset_peak_memory()
    completions = backend.generate(prompts, COMPLETION, settings.temperature, seed=0)
    completions = [c + rng.integers(0, 1000, COMPLETION - len(c)).tolist() for c in completions]
    tokens = pack_batch(prompts, completions, backend.tokenizer.pad_token_id)
    advantages = rng.normal(size=len(tokens)).astype(np.float32)
    stats = backend.grpo_step(GRPOBatch(tokens, advantages, None, None), settings.lr, settings)
    return {"peak_gb": peak_memory_gb(), "framework_peak_gb": backend.peak_memory() / 2**30, "loss": stats["loss"]}


def trl_grpo(recompute: bool) -> dict:
    """GRPOTrainer's step: the rollout of 4 prompts x 8 (exactly 160 tokens each), then the update on 32 rows."""
    import random

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    generator = random.Random(0)

    def reward(prompts, completions, **_):  # rewards that differ, so every row has an advantage, as ours has
        return [generator.random() for _ in completions]

    args = GRPOConfig(output_dir="/tmp/bench_memory_trl_grpo", per_device_train_batch_size=PROMPTS * GROUP,
                      num_generations=GROUP, max_completion_length=COMPLETION,
                      generation_kwargs={"min_new_tokens": COMPLETION}, temperature=0.8, learning_rate=2e-5,
                      beta=0.0, loss_type="grpo", max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                      disable_tqdm=True, bf16=False, gradient_checkpointing=recompute)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          processing_class=AutoTokenizer.from_pretrained(folder, padding_side="left"),
                          train_dataset=Dataset.from_list([{"prompt": c["prompt"]}
                                                           for c in conversations(problems(PROMPTS))]),
                          peft_config=lora_config())
    start_peak()
    trainer.train()
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    return {"peak_gb": peak_memory_gb(), "completion_tokens": lengths[0]}


def rows(quick: bool = False):
    """The table's rows, each as soon as it is measured (bench/common.py's row dictionaries)."""
    ours, peer = run_worker(ours_sft, backend_name="torch", recompute=False), run_worker(trl_sft)
    yield row(f"peak memory, SFT step, SmolLM2-135M LoRA, batch {SFT_BATCH}: ours (PyTorch) vs TRL SFTTrainer + PEFT",
              ours["peak_gb"], peer["peak_gb"], "GB", 1.0, True)
    ours, peer = run_worker(ours_sft, backend_name="mlx", recompute=False), run_worker(mlx_lm_sft)
    yield row(f"peak memory, SFT step, SmolLM2-135M LoRA, batch {SFT_BATCH}: ours (MLX) vs mlx_lm.lora",
              ours["peak_gb"], peer["peak_gb"], "GB", 1.0, True)
    shape = f"{PROMPTS} prompts x G={GROUP}, {COMPLETION} tokens"
    plain = {}
    for recompute in (False, True):
        ours = run_worker(ours_grpo, backend_name="torch", recompute=recompute)
        peer = run_worker(trl_grpo, recompute=recompute)
        plain.setdefault("torch", ours)
        both = "both with gradient checkpointing" if recompute else "neither with gradient checkpointing"
        same_loss = f"; loss {ours['loss'] - plain['torch']['loss']:+.1e} from ours without" if recompute else ""
        yield row(f"peak memory, GRPO step (rollout + update), SmolLM2-135M LoRA, {shape} ({both}{same_loss}): "
                  "ours (PyTorch) vs TRL GRPOTrainer + PEFT", ours["peak_gb"], peer["peak_gb"], "GB", 0.6, True)
    for recompute in (False, True):
        ours = run_worker(ours_grpo, backend_name="mlx", recompute=recompute)
        plain.setdefault("mlx", ours)
        label = f"with gradient checkpointing (loss {ours['loss'] - plain['mlx']['loss']:+.1e} from without)" \
            if recompute else "without gradient checkpointing"
        yield row(f"peak memory, GRPO step (rollout + update), SmolLM2-135M LoRA, {shape}, ours (MLX) {label}; MLX's "
                  f"own count {ours['framework_peak_gb']:.2f} GB", ours["peak_gb"], None, "GB", None, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here, rewritten after each one")
    args = parsed_or_worker(parser)
    if args is not None:
        print_rows(rows(), args.json)

if __name__ == "__main__":
    main()
