"""Loading and saving models with transformers + peft, in the folder layout they read natively."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from shared.checkpoints.layouts import check_backend_reads, checkpoint_kind, rope_fields_for_older_readers
from shared.checkpoints.manifest import checked_adapter_base
from shared.models.pretrained import local_model
from shared.models.prompts import load_tokenizer, stop_token_ids
from shared.runtime.errors import UserError
from shared.training.config import ModelConfig


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, finetune: str) -> torch.dtype:
    # A frozen LoRA base is safe in bf16 on CUDA; trained weights stay fp32 (autocast does the math).
    if device.type == "cuda" and finetune == "lora" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(path: str | Path, config: ModelConfig, device: torch.device, trainable: bool):
    """(model, tokenizer) from a full folder, a hub id, or a PEFT adapter folder naming its base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = local_model(path, config.trust_remote_code)
    kind = checkpoint_kind(folder)
    check_backend_reads(folder, kind, "torch")
    adapter = kind == "peft"
    base = checked_adapter_base(folder) if adapter else str(path)
    dtype = pick_dtype(device, "lora" if adapter else config.finetune)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local_model(base, config.trust_remote_code)), dtype=dtype,
            trust_remote_code=config.trust_remote_code, use_safetensors=True)
        tokenizer = load_tokenizer(folder, config.trust_remote_code)
    except OSError as error:
        raise UserError(f"could not load model {base!r} ({str(error).splitlines()[0][:120]}); "
                        "offline, use --model tiny") from None
    model.config._name_or_path = base  # a saved adapter names its base as given (a hub id, not this machine's cache)
    model.to(device)
    if trainable and config.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"{base} does not support --gradient-checkpointing in transformers")
        # non-reentrant: the reentrant kind gives PEFT adapters no gradient under GRPO (huggingface/trl#3089)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter:
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    elif trainable and config.finetune == "lora":
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model.train(trainable)
    return model, tokenizer


def save_model(model, tokenizer, folder: Path) -> None:
    """A folder plain transformers (or peft, for LoRA) loads: safetensors, tokenizer, chat template."""
    model.save_pretrained(str(folder), safe_serialization=True)
    config_file = Path(folder) / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, **rope_fields_for_older_readers(config)}, indent=2))
    tokenizer.save_pretrained(str(folder))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation = GenerationConfig.from_model_config(base.config)
    generation.eos_token_id = sorted(stop_token_ids(tokenizer))
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(folder))
