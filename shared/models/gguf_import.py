"""GGUF files (llama.cpp's format) imported as Hugging Face folders that transformers and mlx-lm open.

Weights are dequantized to float32 with the `gguf` package's numpy kernels, so no framework is
needed; the tokenizer is rebuilt by transformers' own GGUF tokenizer converter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared.checkpoints.conversion import write_full_model
from shared.checkpoints.tensor_files import Tensor
from shared.runtime.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOP_LEVEL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
INSTALL_GGUF = "pip install gguf"
# the types the gguf package dequantizes in numpy (the tests write F32, Q8_0 and Q4_1; SmolLM2 ships Q4_1 and Q8_0)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def gguf_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"reading a GGUF file needs the gguf package: {INSTALL_GGUF}") from None
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as error:
        raise UserError(f"{path} is not a readable GGUF file ({str(error).splitlines()[0][:120]})") from None


def field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a tensor we do not know."""
    if gguf_name in TOP_LEVEL_TENSORS:
        return TOP_LEVEL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    return None


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for Llama (its rotary pairs adjacent dimensions, HF pairs halves)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def model_config(reader, architecture: str, tied: bool, tensors: dict[str, Tensor]) -> dict:
    def value(name: str, default=None):
        return field_value(reader, f"{architecture}.{name}", default)

    hidden, heads = int(value("embedding_length")), int(value("attention.head_count"))
    layers = int(value("block_count"))
    theta = float(value("rope.freq_base", 10000.0))
    token_id = {name: field_value(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    config = {
        "architectures": [ARCHITECTURES[architecture]], "model_type": architecture,
        "vocab_size": int(tensors["model.embed_tokens.weight"].array.shape[0]),
        "hidden_size": hidden, "intermediate_size": int(value("feed_forward_length")),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": int(value("attention.head_count_kv", heads)),
        "head_dim": int(value("rope.dimension_count", hidden // heads)),
        "hidden_act": "silu", "max_position_embeddings": int(value("context_length", 2048)),
        "rms_norm_eps": float(value("attention.layer_norm_rms_epsilon", 1e-6)),
        # mlx-lm reads rope_theta, transformers 5 reads rope_parameters: write both
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": tied,
        "bos_token_id": token_id["bos"], "eos_token_id": token_id["eos"],
        "pad_token_id": token_id["padding"] if token_id["padding"] is not None else token_id["eos"],
        "dtype": "float32",
    }
    if architecture == "llama":
        config.update(attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    return config


def check_supported(reader, path: Path) -> str:
    """The file's architecture, or a one-line error naming what is supported."""
    architecture = field_value(reader, "general.architecture")
    if architecture not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {architecture!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if field_value(reader, f"{architecture}.rope.scaling.type", "none") != "none" \
            or field_value(reader, f"{architecture}.expert_count"):
        raise UserError(f"{path}: rope scaling and mixture-of-experts GGUF files are not supported")
    for tensor in reader.tensors:
        if hf_tensor_name(tensor.name) is None:
            raise UserError(f"{path}: tensor {tensor.name!r} has no Hugging Face counterpart we know "
                            f"(supported: plain {' and '.join(ARCHITECTURES)} blocks)")
        if tensor.tensor_type.name not in TENSOR_TYPES:
            raise UserError(f"{path}: {tensor.name} is stored as {tensor.tensor_type.name}, which is not supported "
                            f"(supported: {', '.join(TENSOR_TYPES)})")
    return architecture


def read_weights(reader, architecture: str) -> dict[str, Tensor]:
    """Every tensor dequantized to float32 under its Hugging Face name, q/k rows in HF's rotary order."""
    from gguf.quants import dequantize

    heads = int(field_value(reader, f"{architecture}.attention.head_count"))
    kv_heads = int(field_value(reader, f"{architecture}.attention.head_count_kv", heads))
    tensors = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # GGUF lists dimensions innermost first
        if architecture == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            array = unpermute_rotary(array, heads if ".attn_q." in tensor.name else kv_heads)
        tensors[name] = Tensor("F32", np.ascontiguousarray(array))
    return tensors


def write_tokenizer(path: Path, folder: Path, max_length: int) -> None:
    """tokenizer.json, its config and the chat template, through transformers' GGUF tokenizer converter."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (KeyError, ValueError, OSError) as error:
        raise UserError(f"{path}: its tokenizer could not be rebuilt ({str(error).splitlines()[0][:120]})") from None
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(folder))


def import_gguf(path: Path, folder: Path) -> dict:
    """Write the GGUF file at `path` into `folder` as a Hugging Face model folder; returns its config."""
    path = Path(path)
    reader = gguf_reader(path)
    architecture = check_supported(reader, path)
    tensors = read_weights(reader, architecture)
    tied = "lm_head.weight" not in tensors
    config = model_config(reader, architecture, tied, tensors)
    folder = Path(folder)
    write_full_model(folder, tensors, config, "torch")
    write_tokenizer(path, folder, config["max_position_embeddings"])
    eos = [i for i in {config["eos_token_id"]} if i is not None]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return config
