"""The MLX backend on its own: mlx-lm reads its checkpoints with no code of ours; LoRA, QLoRA, seeds."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from shared.algorithms.padding import pack_batch
from shared.models.prompts import prompt_ids, target_ids
from shared.runtime.errors import UserError
from shared.tasks.addition.data import Problem
from shared.training.config import ModelConfig, SFTConfig
from reasoning_mlx.backend import MLXBackend

FULL = ModelConfig(name="tiny", finetune="full")
LORA = dataclasses.replace(FULL, finetune="lora", lora_rank=4, lora_alpha=8.0)
PROBLEMS = [Problem((23, 15, 8)), Problem((1, 2, 3)), Problem((99, 98, 97))]
PAD = 0
ROOT = Path(__file__).resolve().parents[1]


def loaded(folder, config=FULL, trainable=True) -> MLXBackend:
    backend = MLXBackend()
    backend.load(folder, config, trainable)
    return backend


def sft_batch(backend, problems=PROBLEMS):
    return pack_batch([prompt_ids(backend.tokenizer, p) for p in problems],
                      [target_ids(backend.tokenizer, p) for p in problems], PAD)


def train_a_little(backend, steps=5, lr=3e-3) -> list[float]:
    batch = sft_batch(backend)
    return [backend.sft_step(batch, lr, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))["loss"] for _ in range(steps)]


def run_plain_python(code: str) -> str:
    """Run code in a fresh interpreter that cannot see this repository: only mlx-lm's own code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_full_checkpoint_loads_in_plain_mlx_lm(tiny_model_dir, tmp_path):
    backend = loaded(tiny_model_dir)
    train_a_little(backend)
    backend.save(tmp_path)
    ids = sft_batch(backend).input_ids[:1]
    expected = np.array(backend.model(mx.array(ids)))
    np.save(tmp_path / "ids.npy", ids)
    code = f"""
import numpy as np, mlx.core as mx, mlx_lm
model, tokenizer = mlx_lm.load({str(tmp_path)!r})
np.save({str(tmp_path / 'logits.npy')!r}, np.array(model(mx.array(np.load({str(tmp_path / 'ids.npy')!r})))))
print(tokenizer.apply_chat_template([{{"role": "user", "content": "Calculate 1 + 2"}}], add_generation_prompt=True,
                                    tokenize=False))
"""
    rendered = run_plain_python(code)
    assert "<|im_start|>assistant" in rendered  # the chat template travelled with the checkpoint
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-5)


def test_lora_checkpoint_is_an_mlx_lm_adapter(tiny_model_dir, tmp_path):
    backend = loaded(tiny_model_dir, LORA)
    trainable = [name for name, _ in tree_flatten(backend.model.trainable_parameters())]
    assert trainable and all(name.endswith(("lora_a", "lora_b")) for name in trainable)
    train_a_little(backend)
    backend.save(tmp_path)
    assert {"adapters.safetensors", "adapter_config.json"} <= {p.name for p in tmp_path.iterdir()}
    ids = sft_batch(backend).input_ids[:1]
    expected = np.array(backend.model(mx.array(ids)))
    np.save(tmp_path / "ids.npy", ids)
    run_plain_python(f"""
import numpy as np, mlx.core as mx, mlx_lm
model, _ = mlx_lm.load({str(tiny_model_dir)!r}, adapter_path={str(tmp_path)!r})
np.save({str(tmp_path / 'logits.npy')!r}, np.array(model(mx.array(np.load({str(tmp_path / 'ids.npy')!r})))))
""")
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-5)
    # mlx-lm's own generate command runs the adapter too
    result = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_model_dir),
                             "--adapter-path", str(tmp_path), "--prompt", "Calculate 1 + 2", "--max-tokens", "8"],
                            capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    # and the adapter reloads in our backend with the same outputs
    again = loaded(tmp_path, LORA, trainable=False)
    np.testing.assert_allclose(np.array(again.model(mx.array(ids))), expected, atol=1e-6)


def test_lora_reference_policy_is_the_base(tiny_model_dir):
    backend = loaded(tiny_model_dir, LORA)
    train_a_little(backend, lr=1e-2)
    batch = sft_batch(backend)
    plain = loaded(tiny_model_dir, FULL, trainable=False)
    np.testing.assert_allclose(backend.completion_logprobs(batch, reference=True), plain.completion_logprobs(batch),
                               atol=1e-5)
    assert not np.allclose(backend.completion_logprobs(batch), plain.completion_logprobs(batch), atol=1e-3)


def test_full_reference_policy_is_the_starting_weights(tiny_model_dir):
    backend = loaded(tiny_model_dir)
    batch = sft_batch(backend)
    start = backend.completion_logprobs(batch)
    train_a_little(backend)
    np.testing.assert_allclose(backend.completion_logprobs(batch, reference=True), start, atol=1e-6)
    assert not np.allclose(backend.completion_logprobs(batch), start, atol=1e-3)


def test_qlora_trains_adapters_on_a_quantized_base(tiny_model_dir, tmp_path):
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    model, config = quantize_model(model, config, group_size=64, bits=4)
    save_model(tmp_path, model)
    save_config(config, tmp_path / "config.json")
    tokenizer.save_pretrained(str(tmp_path))
    backend = loaded(tmp_path, LORA)
    losses = train_a_little(backend, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match="LoRA"):
        loaded(tmp_path, FULL)


def test_sampling_is_seeded_and_rows_stop_at_their_stop_token(tiny_model_dir):
    backend = loaded(tiny_model_dir, trainable=False)
    prompts = [prompt_ids(backend.tokenizer, p) for p in PROBLEMS]
    first = backend.generate(prompts, 16, temperature=1.0, seed=3)
    assert backend.generate(prompts, 16, temperature=1.0, seed=3) == first
    assert backend.generate(prompts, 16, temperature=1.0, seed=4) != first
    stops = {backend.tokenizer.convert_tokens_to_ids("<|im_end|>"), backend.tokenizer.eos_token_id}
    for row in backend.generate(prompts * 4, 200, temperature=1.0, seed=5):
        assert all(token not in stops for token in row[:-1])


def test_optimizer_moments_travel_with_the_checkpoint(tiny_model_dir, tmp_path):
    backend = loaded(tiny_model_dir)
    batch = sft_batch(backend)
    train_a_little(backend, steps=2, lr=1e-3)
    backend.save(tmp_path)
    resumed = loaded(tmp_path)
    for model in (backend, resumed):
        model.sft_step(batch, 1e-3, SFTConfig(max_grad_norm=1.0, weight_decay=0.0))
    mine, theirs = (dict(tree_flatten(b.model.parameters())) for b in (backend, resumed))
    assert max(np.abs(np.array(mine[n]) - np.array(theirs[n])).max() for n in mine) <= 1e-6


def test_checkpoints_of_the_other_backend_get_a_clear_error(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "x", "peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="--backend torch"):
        loaded(tmp_path, LORA)


def test_mlx_binds_to_openblas_when_installed():
    from reasoning_mlx import find_openblas

    if sys.platform != "linux" or find_openblas() is None:
        pytest.skip("needs Linux with OpenBLAS installed")
    maps = run_plain_python(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import reasoning_mlx, mlx.core; "
                            "print(open('/proc/self/maps').read())")
    assert "libopenblas" in maps
    warned = subprocess.run([sys.executable, "-c", "import mlx.core, reasoning_mlx"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert "slow reference BLAS" in warned.stderr
