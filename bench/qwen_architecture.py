"""Qwen2.5-0.5B's architecture with random weights (no download): LoRA SFT tokens/s, rollout tokens/s and
peak memory, ours on each backend.

    python bench/qwen_architecture.py [--json PATH]      (bench/run.py --only qwen-architecture)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project's root

from bench.common import Rows, row, run_alone, run_worker, tiny_folder  # noqa: E402
from bench.rollout import ours_rollout  # noqa: E402
from bench.sft import ours_sft  # noqa: E402


def qwen_architecture_folder() -> str:
    """Qwen2.5-0.5B's config with random weights (bf16 on disk), and the tiny model's tokenizer."""
    import shutil

    folder = Path("/tmp/bench_qwen2.5-0.5b-random")
    if (folder / "model.safetensors").exists():
        return str(folder)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_folder() / name, staging / name)
    staging.rename(folder)
    return str(folder)


def rows(quick: bool) -> Rows:
    qwen = qwen_architecture_folder()
    for backend_name in ("torch", "mlx"):
        label = "PyTorch" if backend_name == "torch" else "MLX"
        sft = run_worker(ours_sft, backend_name=backend_name, steps=2, finetune="lora", model=qwen, batch_size=4)
        rollout = run_worker(ours_rollout, backend_name=backend_name, rows=8, max_new=32, model=qwen)
        yield row(f"Qwen2.5-0.5B architecture, LoRA SFT tokens/s, batch 4 ({label})", sft["tokens_per_s"],
                  None, "tokens/s", None, False)
        yield row(f"Qwen2.5-0.5B architecture, rollout tokens/s, 8 x 32 ({label})", rollout["tokens_per_s"],
                  None, "tokens/s", None, False)
        yield row(f"Qwen2.5-0.5B architecture, peak memory, LoRA SFT ({label})", sft["peak_rss_gb"],
                  None, "GB (RSS)", None, True)


if __name__ == "__main__":
    run_alone(rows, __doc__)
