"""The embedded tiny model: a Qwen2-architecture model built offline from a seed.

Written as a Hugging Face folder (config.json, model.safetensors, tokenizer files, chat
template) with numpy + safetensors only, so an MLX-only install can build it too, and the
same loading code that serves Qwen/Qwen2.5-0.5B serves it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.checkpoints.folders import atomic_folder, cache_lock, cache_root

logger = logging.getLogger("local_reasoning")

TINY_MODEL_NAME = "tiny"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen's template minus the default system prompt: prompts stay short for a small model.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    seed: int = 0


# Qwen2's pre-tokenizer split: digits stay single tokens, words keep their leading space.
QWEN_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
VOCAB_SIZE = 384


def tokenizer_corpus() -> list[str]:
    """The texts the tiny tokenizer's merges are learned from: chats in the task's own format."""
    from shared.tasks.addition.data import generate_problems, reasoning_target

    problems = [p for count in (2, 3, 4, 5) for p in generate_problems(300, 0, held_out=False, num_operands=count)]
    return [f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n{reasoning_target(p)}<|im_end|>"
            for p in problems]


def model_config(spec: TinyModelSpec) -> dict:
    # the trainer puts the special tokens first: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
    vocab_size, pad_id, eos_id = VOCAB_SIZE, 0, SPECIAL_TOKENS.index("<|im_end|>")
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // spec.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        # mlx-lm reads rope_theta, transformers 5 reads rope_parameters: write both.
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.num_hidden_layers,
        "attention_dropout": 0.0,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
    }


def model_weights(spec: TinyModelSpec) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face Qwen2 names, deterministic in spec.seed."""
    rng = np.random.default_rng(spec.seed)
    config = model_config(spec)
    hidden, head_dim = spec.hidden_size, config["head_dim"]
    kv_width = spec.num_key_value_heads * head_dim
    # GPT-2 style: residual projections shrink with depth so the stream starts near identity.
    residual_std = spec.init_std / np.sqrt(2 * spec.num_hidden_layers)

    def normal(shape, std=spec.init_std):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal((config["vocab_size"], hidden))}
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        weights.update({
            f"{prefix}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{prefix}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
            f"{prefix}.self_attn.q_proj.weight": normal((hidden, hidden)),
            f"{prefix}.self_attn.q_proj.bias": np.zeros(hidden, np.float32),
            f"{prefix}.self_attn.k_proj.weight": normal((kv_width, hidden)),
            f"{prefix}.self_attn.k_proj.bias": np.zeros(kv_width, np.float32),
            f"{prefix}.self_attn.v_proj.weight": normal((kv_width, hidden)),
            f"{prefix}.self_attn.v_proj.bias": np.zeros(kv_width, np.float32),
            f"{prefix}.self_attn.o_proj.weight": normal((hidden, hidden), residual_std),
            f"{prefix}.mlp.gate_proj.weight": normal((spec.intermediate_size, hidden)),
            f"{prefix}.mlp.up_proj.weight": normal((spec.intermediate_size, hidden)),
            f"{prefix}.mlp.down_proj.weight": normal((hidden, spec.intermediate_size), residual_std),
        })
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    return weights


def build_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer, its merges learned from the task's own text.

    Every byte is in the vocabulary and digits are never merged, so any text encodes and each digit
    is one token; the merges make the template's words single tokens (sequences about half as long).
    The pipeline is exactly the one transformers' Qwen2Tokenizer rebuilds on load, so the tokenizer
    reloaded through AutoTokenizer (or mlx-lm) tokenizes exactly as in training.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer)
    return tokenizer


def tokenizer_config() -> dict:
    added = {
        str(index): {"content": token, "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": True}
        for index, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": TinyModelSpec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tiny_model(folder: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write the tiny model as a Hugging Face folder, atomically (temporary folder, then rename)."""
    from safetensors.numpy import save_file

    with atomic_folder(folder) as staging:
        tokenizer = build_tokenizer()
        tokenizer.save(str(staging / "tokenizer.json"))
        if tokenizer.get_vocab_size() > VOCAB_SIZE or tokenizer.token_to_id("<|im_end|>") != 2:
            raise RuntimeError("tiny tokenizer does not fit the model's vocabulary layout")
        config = model_config(spec)
        save_file(model_weights(spec), str(staging / "model.safetensors"), metadata={"format": "pt"})
        generation = {"bos_token_id": config["bos_token_id"], "pad_token_id": config["pad_token_id"],
                      "eos_token_id": [config["eos_token_id"], config["pad_token_id"]]}
        files = {
            "config.json": config,
            "generation_config.json": generation,
            "tokenizer_config.json": tokenizer_config(),
            "special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            "vocab.json": tokenizer.get_vocab(),
            "tiny_model_spec.json": asdict(spec),
        }
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        (staging / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return Path(folder)


def tiny_model_cache_dir() -> Path:
    return cache_root() / "tiny-qwen2-v2"


def ensure_tiny_model(spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """The tiny model's folder, built on first use and cached (rebuilt if the spec changed)."""
    folder = tiny_model_cache_dir()
    spec_file = folder / "tiny_model_spec.json"
    with cache_lock(folder):
        if spec_file.exists() and json.loads(spec_file.read_text()) == asdict(spec):
            return folder
        logger.info("building the tiny model in %s (once)", folder)
        return write_tiny_model(folder, spec)
