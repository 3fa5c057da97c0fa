"""Loading and saving models with mlx-lm, in the folder layouts mlx-lm reads natively."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load as mlx_load, save_config, save_model as save_weights

from shared.checkpoints.layouts import (ADAPTER_CONFIG_FILE, MLX_ADAPTER_WEIGHTS_FILE, check_backend_reads,
                                        checkpoint_kind, rope_fields_for_older_readers)
from shared.checkpoints.manifest import checked_adapter_base
from shared.models.pretrained import local_model
from shared.models.prompts import load_tokenizer, stop_token_ids
from shared.runtime.errors import UserError
from shared.training.config import ModelConfig

LORA_LEAVES = ("lora_a", "lora_b")


class LoadedModel:
    """An mlx-lm model with what saving it needs: its config, base path and LoRA settings."""

    def __init__(self, model: nn.Module, tokenizer, config: dict, base: str, lora: dict | None, base_folder: Path):
        self.model, self.tokenizer, self.config, self.base, self.lora = model, tokenizer, config, base, lora
        self.base_folder = base_folder


def lora_parameters(model: nn.Module, config: ModelConfig) -> dict:
    """mlx-lm's LoRA settings from ours: its `scale` is PEFT's alpha / r; keys are paths inside a block."""
    keys = sorted(name for name, _ in model.layers[0].named_modules()
                  if name.rsplit(".", 1)[-1] in config.lora_targets)
    return {"rank": config.lora_rank, "scale": config.lora_alpha / config.lora_rank,
            "dropout": config.lora_dropout, "keys": keys}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def load_model(path: str | Path, config: ModelConfig, trainable: bool) -> LoadedModel:
    """A full folder, a hub id, or an mlx-lm adapter folder naming its base; LoRA added if asked."""
    folder = local_model(path, config.trust_remote_code)
    kind = checkpoint_kind(folder)
    check_backend_reads(folder, kind, "mlx")
    base = checked_adapter_base(folder) if kind == "mlx_lora" else str(path)  # as given: saved adapters name it
    base_folder = local_model(base, config.trust_remote_code)
    base_config = base_folder / "config.json"
    overrides = rope_fields_for_older_readers(json.loads(base_config.read_text())) if base_config.exists() else {}
    try:
        model, _, model_config = mlx_load(str(base_folder), adapter_path=str(folder) if kind == "mlx_lora" else None,
                                          model_config=overrides, return_config=True,
                                          trust_remote_code=config.trust_remote_code)
        tokenizer = load_tokenizer(str(folder), config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load model {base!r} ({str(error).splitlines()[0][:120]}); "
                        "offline, use --model tiny") from None
    lora = None
    if kind == "mlx_lora":
        lora = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())["lora_parameters"]
    elif trainable and config.finetune == "lora":
        lora = lora_parameters(model, config)
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), lora)
    if lora is not None:
        model.freeze()
        model.unfreeze(keys=list(LORA_LEAVES), strict=False)
    elif trainable and is_quantized(model):
        raise UserError("a quantized model trains only through LoRA (QLoRA): use --finetune lora")
    if trainable and config.gradient_checkpointing:
        for layer in model.layers:
            layer.__class__ = recomputed(type(layer))
    model.train(trainable)
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, model_config, base, lora, base_folder)


@functools.cache
def recomputed(layer_class: type) -> type:
    """The decoder layer with gradient checkpointing: its activations recomputed in the backward pass, not kept
    (mlx-lm's grad_checkpoint does the same to the class itself, for every model in the process)."""
    def __call__(self, x, mask=None, cache=None):
        if cache is not None:  # a KV cache is written as the layer runs: generation and the prefix pass run plainly
            return layer_class.__call__(self, x, mask, cache)

        def layer(parameters, x):
            self.update(parameters)
            return layer_class.__call__(self, x, mask)
        return mx.checkpoint(layer)(self.trainable_parameters(), x)
    return type(f"Recomputed{layer_class.__name__}", (layer_class,), {"__call__": __call__})


def set_lora_scale(model: nn.Module, scale: float | None) -> float | None:
    """Set every LoRA layer's scale (0 turns the adapters off); returns the previous one."""
    previous = None
    for _, module in model.named_modules():
        if all(hasattr(module, leaf) for leaf in LORA_LEAVES):
            previous, module.scale = module.scale, scale
    return previous


def save_model(loaded: LoadedModel, folder: Path) -> None:
    """LoRA: adapters.safetensors + adapter_config.json (`mlx_lm.load(base, adapter_path=...)`).
    Full: an HF-named safetensors folder `mlx_lm.load` (and transformers) read. Tokenizer in both."""
    folder = Path(folder)
    if loaded.lora is not None:
        adapters = dict(tree_flatten(loaded.model.trainable_parameters()))
        mx.save_safetensors(str(folder / MLX_ADAPTER_WEIGHTS_FILE), adapters, metadata={"format": "mlx"})
        adapter_config = {"fine_tune_type": "lora", "model": loaded.base, "num_layers": len(loaded.model.layers),
                          "lora_parameters": loaded.lora}
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
    else:
        save_weights(folder, loaded.model)
        save_config(dict(loaded.config), folder / "config.json")
    loaded.tokenizer.save_pretrained(str(folder))
    write_generation_config(loaded, folder)


def write_generation_config(loaded: LoadedModel, folder: Path) -> None:
    """The base's generation settings, stopping at the end of the assistant's turn."""
    source = loaded.base_folder / "generation_config.json"
    generation = json.loads(source.read_text()) if source.exists() else {}
    generation["eos_token_id"] = sorted(stop_token_ids(loaded.tokenizer))
    generation["pad_token_id"] = loaded.tokenizer.pad_token_id
    (Path(folder) / "generation_config.json").write_text(json.dumps(generation, indent=2))
