"""Checkpoints converted between PyTorch and MLX, checked by each ecosystem's own loaders.

The loaders here are the libraries' plain entry points (transformers + peft, mlx_lm.load), with
no code of ours between them and the converted files.
"""
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import mlx.core as mx
import mlx_lm
from mlx_lm.utils import quantize_model, save_config, save_model
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from shared.checkpoints.conversion import unpack_quantized
from shared.checkpoints.folders import save_checkpoint
from shared.checkpoints.manifest import weights_sha256
from shared.checkpoints.tensor_files import Tensor, from_float32, read_tensors, write_tensors
from shared.models.tiny_model import TinyModelSpec, write_tiny_model
from shared.training.config import ModelConfig
from reasoning_mlx.backend import MLXBackend
from reasoning_torch.backend import TorchBackend
from test_cli import run_cli

LORA = ModelConfig(name="tiny", finetune="lora", lora_rank=4, lora_alpha=8.0)
IDS = np.random.default_rng(0).integers(3, 384, size=(3, 40))


def randomize(parameters, names, seed=0):
    """Non-zero LoRA factors (PEFT starts B at zero, which would hide every orientation mistake)."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(scale=0.05, size=parameters[name].shape).astype(np.float32) for name in names}


@pytest.fixture(scope="module")
def peft_checkpoint(tiny_model_dir, tmp_path_factory):
    backend = TorchBackend(device="cpu")
    backend.load(tiny_model_dir, LORA, trainable=True)
    parameters = dict(backend.model.named_parameters())
    with torch.no_grad():
        for name, value in randomize(parameters, [n for n, p in parameters.items() if p.requires_grad]).items():
            parameters[name].copy_(torch.from_numpy(value))
    return save_checkpoint(backend, tmp_path_factory.mktemp("peft") / "adapter", "{}")


def random_mlx_adapter(base, folder, seed):
    """An mlx-lm adapter with non-zero factors on `base` (quantized or not), saved as the backend saves it."""
    from mlx.utils import tree_flatten

    backend = MLXBackend()
    backend.load(base, LORA, trainable=True)
    parameters = dict(tree_flatten(backend.model.trainable_parameters()))
    backend.model.load_weights([(n, mx.array(v)) for n, v in randomize(parameters, parameters, seed).items()],
                               strict=False)
    return save_checkpoint(backend, folder, "{}")


@pytest.fixture(scope="module")
def mlx_checkpoint(tiny_model_dir, tmp_path_factory):
    return random_mlx_adapter(tiny_model_dir, tmp_path_factory.mktemp("mlx") / "adapter", seed=1)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


def peft_logits(base, adapter) -> np.ndarray:
    return torch_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)))


def mlx_logits(path, adapter=None) -> np.ndarray:
    model, _ = mlx_lm.load(str(path), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array(IDS)))


def convert(source, target, output, *extra):
    result = run_cli("convert", source, "--to", target, "--output", output, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return output


def adapter_tensors(folder):
    name = "adapters.safetensors" if (folder / "adapters.safetensors").exists() else "adapter_model.safetensors"
    return {k: (t.dtype, t.array.shape, t.array.tobytes()) for k, t in read_tensors(folder / name)[0].items()}


def test_peft_adapter_becomes_an_mlx_lm_adapter(tiny_model_dir, peft_checkpoint, tmp_path):
    expected = peft_logits(tiny_model_dir, peft_checkpoint)
    assert np.abs(expected - torch_logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))).max() > 1e-2
    converted = convert(peft_checkpoint, "mlx", tmp_path / "mlx")
    assert np.abs(mlx_logits(tiny_model_dir, converted) - expected).max() <= 1e-4
    config = json.loads((converted / "adapter_config.json").read_text())
    assert config["num_layers"] == 4 and config["lora_parameters"]["scale"] == LORA.lora_alpha / LORA.lora_rank
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["converted_from"]["backend"] == "torch" and manifest["lora"]["alpha"] == LORA.lora_alpha
    assert manifest["base"]["weights_sha256"] == weights_sha256(tiny_model_dir)
    generated = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_model_dir),
                                "--adapter-path", str(converted), "--prompt", "Calculate 1 + 2", "--max-tokens", "4"],
                               capture_output=True, text=True, timeout=300, cwd="/")
    assert generated.returncode == 0, generated.stderr[-2000:]


def test_mlx_lm_adapter_becomes_a_peft_adapter(tiny_model_dir, mlx_checkpoint, tmp_path):
    expected = mlx_logits(tiny_model_dir, mlx_checkpoint)
    converted = convert(mlx_checkpoint, "torch", tmp_path / "peft")
    assert np.abs(peft_logits(tiny_model_dir, converted) - expected).max() <= 1e-4
    assert np.abs(torch_logits(AutoPeftModelForCausalLM.from_pretrained(str(converted))) - expected).max() <= 1e-4
    assert json.loads((converted / "adapter_config.json").read_text())["lora_alpha"] == LORA.lora_alpha


def test_round_trips_are_bit_exact(peft_checkpoint, mlx_checkpoint, tmp_path):
    there = convert(peft_checkpoint, "mlx", tmp_path / "a")
    assert adapter_tensors(convert(there, "torch", tmp_path / "b")) == adapter_tensors(peft_checkpoint)
    there = convert(mlx_checkpoint, "torch", tmp_path / "c")
    assert adapter_tensors(convert(there, "mlx", tmp_path / "d")) == adapter_tensors(mlx_checkpoint)


def test_swapped_lora_factors_load_silently_on_a_square_layer_and_are_caught(tiny_model_dir, peft_checkpoint,
                                                                                tmp_path):
    """q_proj is 128 x 128: storing B as lora_a and A as lora_b has the right shapes and the wrong function."""
    expected = peft_logits(tiny_model_dir, peft_checkpoint)
    broken = convert(peft_checkpoint, "mlx", tmp_path / "broken")
    tensors, metadata = read_tensors(broken / "adapters.safetensors")
    pairs = {name.rsplit(".", 1)[0] for name in tensors if ".q_proj." in name}
    assert pairs
    for path in pairs:
        a, b = tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"]
        tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = b.T, a.T
    write_tensors(broken / "adapters.safetensors", tensors, metadata)
    assert np.abs(mlx_logits(tiny_model_dir, broken) - expected).max() > 1e-2  # loads without complaint


def test_layer_selection_maps_both_ways(tiny_model_dir, tmp_path):
    """PEFT's layers_to_transform [0, 2] (not mlx-lm's 'last N') and mlx-lm's num_layers 2 (layers 2, 3)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                             layers_to_transform=[0, 2], layers_pattern="layers"))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in randomize(parameters, [n for n in parameters if "lora_" in n]).items():
            parameters[name].copy_(torch.from_numpy(value))
    model.save_pretrained(str(tmp_path / "peft"))
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "peft")
    converted = convert(tmp_path / "peft", "mlx", tmp_path / "mlx")
    assert np.abs(mlx_logits(tiny_model_dir, converted) - torch_logits(model)).max() <= 1e-4

    mlx_adapter = tmp_path / "mlx_last_two"
    mlx_adapter.mkdir()
    model, _ = mlx_lm.load(str(tiny_model_dir))
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.v_proj"]})
    parameters = dict(tree_flatten(model.trainable_parameters()))
    model.load_weights([(n, mx.array(v)) for n, v in randomize(parameters, parameters, 2).items()], strict=False)
    mx.save_safetensors(str(mlx_adapter / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (mlx_adapter / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "model": str(tiny_model_dir), "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.v_proj"]}}))
    converted = convert(mlx_adapter, "torch", tmp_path / "peft_last_two")
    config = json.loads((converted / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2, 3] and config["target_modules"] == ["v_proj"]
    assert np.abs(peft_logits(tiny_model_dir, converted) - np.array(model(mx.array(IDS)))).max() <= 1e-4


def test_full_checkpoints_convert_both_ways_and_cast(tiny_model_dir, tmp_path):
    expected = torch_logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    to_mlx = convert(tiny_model_dir, "mlx", tmp_path / "mlx")
    assert np.abs(mlx_logits(to_mlx) - expected).max() <= 1e-4
    back = convert(to_mlx, "torch", tmp_path / "torch")
    assert weights_sha256(back) == weights_sha256(tiny_model_dir)
    assert json.loads((back / "manifest.json").read_text())["converted_from"]["backend"] == "mlx"
    half = convert(tiny_model_dir, "torch", tmp_path / "bf16", "--dtype", "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(str(half))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert np.abs(torch_logits(model.float()) - expected).max() < 0.5  # bf16 rounding, not a different model


def test_merged_adapters_equal_the_adapter_on_its_base(tiny_model_dir, peft_checkpoint, mlx_checkpoint, tmp_path):
    merged = convert(peft_checkpoint, "mlx", tmp_path / "merged_mlx", "--merge")
    assert np.abs(mlx_logits(merged) - peft_logits(tiny_model_dir, peft_checkpoint)).max() <= 1e-4
    merged = convert(mlx_checkpoint, "torch", tmp_path / "merged_torch", "--merge")
    expected = mlx_logits(tiny_model_dir, mlx_checkpoint)
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(str(merged))) - expected).max() <= 1e-4


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized")
    model, tokenizer, config = mlx_lm.utils.load(str(tiny_model_dir), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    tokenizer.save_pretrained(str(folder))
    return folder


def test_quantized_mlx_model_is_dequantized_for_torch(quantized_dir, tmp_path):
    converted = convert(quantized_dir, "torch", tmp_path / "torch")
    assert "quantization" not in json.loads((converted / "config.json").read_text())
    got = torch_logits(AutoModelForCausalLM.from_pretrained(str(converted)))
    assert np.abs(got - mlx_logits(quantized_dir)).max() <= 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpacking_matches_mlx_dequantize(bits):
    weight = mx.array(np.random.default_rng(bits).normal(size=(8, 128)).astype(np.float32))
    packed, scales, biases = mx.quantize(weight, group_size=32, bits=bits)
    values = unpack_quantized(np.array(packed), bits).reshape(8, -1, 32)
    ours = (values * np.array(scales)[..., None] + np.array(biases)[..., None]).reshape(8, 128)
    np.testing.assert_allclose(ours, np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits)),
                               atol=1e-6)


def test_bfloat16_rounding_matches_torch():
    values = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 10.0 ** np.arange(-5, 5).repeat(100)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(from_float32(values, "BF16").array, expected)
    assert from_float32(values, "BF16").as_float32().dtype == np.float32


def test_written_files_read_back_in_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": from_float32(np.arange(6, dtype=np.float32).reshape(2, 3), "BF16"),
               "b": Tensor("I64", np.arange(5))}
    write_tensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded["a"].dtype == torch.bfloat16 and loaded["a"].float().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert loaded["b"].tolist() == [0, 1, 2, 3, 4]


def test_an_adapter_is_refused_on_a_different_base(peft_checkpoint, tmp_path):
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(seed=7))
    result = run_cli("convert", peft_checkpoint, "--to", "mlx", "--output", tmp_path / "out", "--base", other)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "sha256" in result.stderr.strip().splitlines()[-1] and not (tmp_path / "out").exists()
    moved = tmp_path / "moved"  # the same adapter pointed at the wrong base is refused at load time too
    shutil.copytree(peft_checkpoint, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    result = run_cli("eval", "--checkpoint", moved, "--num-samples", "2")
    assert result.returncode == 1 and "sha256" in result.stderr.strip().splitlines()[-1]


def test_corrupted_and_unknown_checkpoints_are_one_line_errors(mlx_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mlx_checkpoint, broken)
    data = (broken / "adapters.safetensors").read_bytes()
    (broken / "adapters.safetensors").write_bytes(data[:len(data) // 2])
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "weights.safetensors").write_bytes(data)
    (unknown / "config.json").write_text("{}")
    for source, message in ((broken, "truncated"), (unknown, "not a checkpoint layout")):
        result = run_cli("convert", source, "--to", "torch", "--output", tmp_path / "out")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
    taken = run_cli("convert", mlx_checkpoint, "--to", "torch", "--output", broken)
    assert taken.returncode == 1 and "already exists" in taken.stderr


@pytest.mark.slow  # four CLI runs
def test_eval_runs_either_backends_adapter_on_either_backend(mlx_checkpoint, peft_checkpoint):
    for checkpoint in (mlx_checkpoint, peft_checkpoint):
        outputs = [run_cli("infer", "--checkpoint", checkpoint, "--backend", backend) for backend in ("torch", "mlx")]
        for output in outputs:
            assert output.returncode == 0, output.stderr[-2000:]
        assert outputs[0].stdout == outputs[1].stdout  # greedy: the same text from the same function
