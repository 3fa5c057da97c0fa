"""SFT tokens/s on the tiny model: ours (PyTorch) vs TRL SFTTrainer; ours (MLX) vs mlx_lm.lora, full and LoRA.

    python bench/sft.py [--quick] [--json PATH]      (bench/run.py --only tiny-sft)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project's root

from bench.common import (LORA_TARGETS, LR, SFT_BATCH, Rows, after_warmup, conversations, lora_config,  # noqa: E402
                          peak_memory_gb, problems, row, run_alone, run_worker, step_timer, tiny_folder)


def ours_sft(backend_name: str, steps: int, finetune: str = "full", model: str | None = None,
             batch_size: int = SFT_BATCH) -> dict:
    from shared.algorithms.padding import pack_batch
    from shared.models.prompts import encode_prompts, encode_targets
    from shared.training.config import ModelConfig, SFTConfig
    from backends import make_backend

    backend = make_backend(backend_name)
    backend.load(Path(model) if model else tiny_folder(),
                 ModelConfig(name="tiny", finetune=finetune, lora_rank=16, lora_alpha=32), trainable=True)
    tokenizer = backend.tokenizer
    durations, tokens = [], []
    data = problems(batch_size * (steps + 1))
    for step in range(steps + 1):
        chosen = data[step * batch_size:(step + 1) * batch_size]
        batch = pack_batch(encode_prompts(tokenizer, chosen), encode_targets(tokenizer, chosen), tokenizer.pad_token_id)
        began = time.perf_counter()
        backend.sft_step(batch, LR if finetune == "full" else 2e-4, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
        durations.append(time.perf_counter() - began)
        tokens.append(int(batch.attention_mask.sum()))
    return {"tokens_per_s": after_warmup(durations, tokens, 1), "peak_rss_gb": peak_memory_gb()}


def trl_sft(steps: int, model: str | None = None, batch_size: int = SFT_BATCH, lora: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = model or tiny_folder()
    network = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    timing = step_timer()
    args = SFTConfig(output_dir="/tmp/bench_trl_sft", per_device_train_batch_size=batch_size, max_steps=steps + 1,
                     learning_rate=2e-4 if lora else LR, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                     logging_steps=10**9, completion_only_loss=True, use_cpu=True, dataloader_num_workers=0,
                     adam_beta2=0.98, max_grad_norm=1.0, disable_tqdm=True, bf16=False)  # fp32 like ours
    trainer = SFTTrainer(model=network, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(conversations(problems(batch_size * (steps + 1)))),
                         callbacks=[timing], peft_config=lora_config() if lora else None)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    per_step = sum(lengths) / len(lengths) * batch_size  # tokens without padding, as ours counts them
    return {"tokens_per_s": per_step * (len(timing.durations) - 1) / sum(timing.durations[1:])}


def mlx_lm_sft(steps: int, finetune: str, model: str | None = None, batch_size: int = SFT_BATCH) -> dict:
    """mlx_lm.lora's own training loop (`mlx_lm.tuner.trainer.train`), on our data, batch and lengths."""
    import reasoning_mlx  # noqa: F401  (first: OpenBLAS on Linux, as ours gets)
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    network, tokenizer = load(str(model or tiny_folder()))
    if finetune == "lora":
        network.freeze()
        keys = sorted(name for name, _ in network.layers[0].named_modules()
                      if name.rsplit(".", 1)[-1] in LORA_TARGETS)
        linear_to_lora_layers(network, len(network.layers), {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": keys})
    records = [{"messages": c["prompt"] + c["completion"]} for c in conversations(problems(batch_size * (steps + 1)))]
    dataset = CacheDataset(ChatDataset(records, tokenizer, mask_prompt=True))

    class Report(TrainingCallback):
        def __init__(self):
            self.reports = []

        def on_train_loss_report(self, info):
            self.reports.append(info)

    report = Report()
    args = TrainingArgs(batch_size=batch_size, iters=steps + 1, steps_per_report=1, steps_per_eval=10**9,
                        steps_per_save=10**9, max_seq_length=512, adapter_file="/tmp/bench_mlx_lm_adapters.safetensors")
    optimizer = optim.AdamW(learning_rate=LR if finetune == "full" else 2e-4, betas=[0.9, 0.98], bias_correction=True)
    train(model=network, optimizer=optimizer, train_dataset=dataset, args=args, training_callback=report)
    # mlx-lm counts only completion tokens; per step, count prompt and completion as ours and TRL's rows do
    per_step = sum(len(dataset[i][0]) for i in range(len(dataset))) / len(dataset) * batch_size
    seconds = [1 / r["iterations_per_second"] for r in report.reports[1:]]  # the first step compiles
    return {"tokens_per_s": per_step * len(seconds) / sum(seconds)}


def rows(quick: bool) -> Rows:
    steps = 6 if quick else 20
    ours = run_worker(ours_sft, backend_name="torch", steps=steps)
    trl = run_worker(trl_sft, steps=steps)
    yield row("SFT tokens/s, tiny, full: ours (PyTorch) vs TRL SFTTrainer", ours["tokens_per_s"],
              trl["tokens_per_s"], "tokens/s", 1.0, False)
    for finetune in ("full", "lora"):
        ours = run_worker(ours_sft, backend_name="mlx", steps=steps, finetune=finetune)
        peer = run_worker(mlx_lm_sft, steps=steps, finetune=finetune)
        yield row(f"SFT tokens/s, tiny, {finetune}: ours (MLX) vs mlx_lm.lora", ours["tokens_per_s"],
                  peer["tokens_per_s"], "tokens/s", 1.0, False)


if __name__ == "__main__":
    run_alone(rows, __doc__)
