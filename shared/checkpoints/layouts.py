"""Checkpoint folder layouts: file names, which layout a folder holds, and which backend reads it.

The lowest layer of the checkpoint code: everything here reads a folder, nothing writes one.
"""
from __future__ import annotations

import json
from pathlib import Path

from shared.checkpoints.tensor_files import check_safetensors
from shared.runtime.errors import UsageError, UserError

RUN_CONFIG_FILE = "run_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MLX_ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW moments, `{parameter}.exp_avg[_sq]` and `step`

# The one table of which library reads which layout; a full Hugging Face folder loads in both.
BACKEND_OF_LAYOUT = {"peft": "torch", "mlx_lora": "mlx", "mlx_quantized": "mlx"}


def native_layouts(backend: str) -> tuple[str, ...]:
    return ("full", *sorted(layout for layout, owner in BACKEND_OF_LAYOUT.items() if owner == backend))


def check_backend_reads(path: Path, layout: str, backend: str) -> None:
    """A one-line error when `backend` cannot load a folder of `layout` (say what can)."""
    owner = BACKEND_OF_LAYOUT.get(layout)
    if owner and owner != backend:
        library = {"peft": "a PEFT (PyTorch) LoRA adapter", "mlx_lora": "an mlx-lm LoRA adapter",
                   "mlx_quantized": "an mlx-quantized model"}[layout]
        raise UserError(f"{path} is {library}: use --backend {owner}, "
                        f"or python cli.py convert {path} --to {backend}")


def checkpoint_kind(path: Path) -> str:
    """'full' (a Hugging Face model folder), 'peft' (a PEFT LoRA adapter) or 'mlx_lora' (mlx-lm's)."""
    path = Path(path)
    if (path / MLX_ADAPTER_WEIGHTS_FILE).exists():
        return "mlx_lora"
    if (path / ADAPTER_CONFIG_FILE).exists():
        return "peft"
    return "full"


def detect_layout(folder: Path) -> str:
    """'peft', 'mlx_lora', 'mlx_quantized' or 'full' (checkpoint_kind, checked); a one-line error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint {str(folder)!r} does not exist")
    kind = checkpoint_kind(folder)
    if kind == "peft" and not (folder / PEFT_WEIGHTS_FILE).exists():
        raise UserError(f"{folder} has {ADAPTER_CONFIG_FILE} but no {PEFT_WEIGHTS_FILE} or "
                        f"{MLX_ADAPTER_WEIGHTS_FILE}: not an adapter layout this tool knows")
    if kind == "full":
        if not (folder / "config.json").exists() or not model_weight_files(folder):
            raise UserError(f"{folder} is not a checkpoint layout this tool knows (a Hugging Face model folder, "
                            "a PEFT adapter or an mlx-lm adapter)")
        if "quantization" in read_json(folder / "config.json"):
            return "mlx_quantized"
    return kind


def check_checkpoint(path: Path) -> Path:
    """A readable model folder, or a one-line error saying what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist (train one with: python cli.py train)")
    weights = list(path.glob("*.safetensors"))
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG_FILE).exists():
        inside = [name for name in ("reasoning_final", "sft_final") if (path / name).is_dir()]
        hint = f" (a run's folder: its checkpoints are {' and '.join(str(path / n) for n in inside)})" if inside else ""
        raise UserError(f"{path} is not a model folder: no config.json or {ADAPTER_CONFIG_FILE}{hint}")
    if not weights:
        raise UserError(f"{path} holds no .safetensors weights")
    for file in weights:
        check_safetensors(file)
    return path


def adapter_base(path: Path) -> str:
    """The base model an adapter folder was trained on, as its own library records it."""
    config = json.loads((Path(path) / ADAPTER_CONFIG_FILE).read_text())
    key = "model" if checkpoint_kind(path) == "mlx_lora" else "base_model_name_or_path"
    if not config.get(key):
        raise UserError(f"{path}/{ADAPTER_CONFIG_FILE} does not name its base model ({key!r})")
    return config[key]


def rope_fields_for_older_readers(config: dict) -> dict:
    """transformers 5 writes rope_theta only inside rope_parameters; mlx-lm reads the top-level field
    and silently falls back to its own default (1e6) without it."""
    rope = config.get("rope_parameters")
    if "rope_theta" in config or not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    fields = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    return fields


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def model_weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("model*.safetensors"))


def model_dimensions(folder: Path) -> dict | None:
    """config.json of a local model folder, or of a local adapter's base; None where it is not at hand."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG_FILE).exists() and not (folder / "config.json").exists():
        folder = Path(adapter_base(folder))
    return read_json(folder / "config.json") if (folder / "config.json").is_file() else None


def smallest_lora_side(config: dict, targets: tuple[str, ...]) -> tuple[int, str]:
    """(the smaller dimension of the narrowest layer LoRA adapts, its name): a rank beyond it adds nothing."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    sides = {"q_proj": min(hidden, heads * head_dim),
             "k_proj": min(hidden, config.get("num_key_value_heads", heads) * head_dim),
             "o_proj": min(hidden, heads * head_dim),
             "gate_proj": min(hidden, config.get("intermediate_size", hidden))}
    sides.update(v_proj=sides["k_proj"], up_proj=sides["gate_proj"], down_proj=sides["gate_proj"])
    return min((sides.get(name, hidden), name) for name in targets)


def check_lora_rank(rank: int, targets: tuple[str, ...], folder: Path) -> None:
    config = model_dimensions(folder)
    if config and "hidden_size" in config:
        side, layer = smallest_lora_side(config, targets)
        if rank > side:
            raise UsageError(f"--lora-rank {rank} is more than {side}, the smaller side of {layer} in {folder}: "
                             f"at most {side}")
